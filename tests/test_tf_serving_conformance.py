"""``mnist serve`` against TF Serving's own behaviour, point by point. Each test names the
TF Serving source or test (tensorflow/serving, 2.21) that it follows."""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import grpc
import httpx
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2, get_model_metadata_pb2, inference_pb2, get_model_status_pb2, model_management_pb2, model_service_pb2_grpc,
    predict_pb2, prediction_service_pb2_grpc, regression_pb2,
)

from mnist_client.client import Target, predict_probabilities
from serving.manager import LoadRetries
from serving.model_config import single_model_config
from serving.tensors import to_tensor_proto
from storage.embedded import free_port
from tests.conftest import start_model_server
from tests.half_plus_two import export_half_plus_two


@pytest.fixture(scope="module")
def half_plus_two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_half_plus_two(tmp_path_factory.mktemp("hp2") / "model" / "1")


@pytest.fixture()
def hp2_server(half_plus_two: Path, tmp_path: Path):
    base = tmp_path / "hp2"
    shutil.copytree(half_plus_two, base / "1")
    rest_port = free_port()
    server, address = start_model_server(base, rest_api_port=rest_port)
    yield server, address, f"http://127.0.0.1:{rest_port}/v1/models/mnist"
    server.stop(grace=1)


@contextmanager
def served_copy(saved_model_dir: Path, tmp_path: Path, **options) -> Iterator[tuple[object, str, Path]]:
    """The MNIST SavedModel as version 1 of a fresh model directory, served with ``options``."""
    base = tmp_path / "models" / "mnist"
    shutil.copytree(saved_model_dir, base / "1")
    server, address = start_model_server(base, **options)
    try:
        yield server, address, base
    finally:
        server.stop(grace=1)


@pytest.fixture()
def mnist_server(saved_model_dir: Path, tmp_path: Path):
    with served_copy(saved_model_dir, tmp_path) as served:
        yield served


def image_request(images: np.ndarray) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.inputs["image"].CopyFrom(to_tensor_proto(images))
    return request


def stub(address: str) -> prediction_service_pb2_grpc.PredictionServiceStub:
    return prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(address))


def model_stub(address: str) -> model_service_pb2_grpc.ModelServiceStub:
    return model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(address))


def rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30)
    return caught.value


def hp2_predict(values: list[float], **spec) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = spec.pop("name", "mnist")
    for key, value in spec.items():
        setattr(request.model_spec, key, value)
    request.inputs["x"].CopyFrom(to_tensor_proto(np.array(values, dtype=np.float32)))
    return request


# --- 1. Predict outputs (predict_util.cc PostProcessPredictionResult; mnist_client.py) -----------
def test_predict_answers_in_float_val_as_tf_serving(mnist_server, test_digits) -> None:
    _, address, _ = mnist_server
    request = image_request(test_digits[:3])
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(test_digits[:3]))  # as mnist_client.py sends it
    response = stub(address).Predict(request, timeout=30)
    output = response.outputs["probabilities"]
    assert not output.tensor_content and len(output.float_val) == 30  # AsProtoField, what mnist_client.py reads
    scores = np.array(output.float_val).reshape(3, 10)  # mnist_client.py's way of reading the answer
    assert np.allclose(tf.make_ndarray(output), scores) and np.allclose(scores.sum(axis=1), 1, atol=1e-4)
    probabilities, version = predict_probabilities(test_digits[:3], Target(address))  # our client: float_val
    assert version == 1 and np.allclose(probabilities, scores, atol=1e-6)


def test_tensor_content_only_with_the_flag(saved_model_dir: Path, tmp_path: Path, test_digits) -> None:
    from serving.inference import PredictOptions

    with served_copy(saved_model_dir, tmp_path, predict=PredictOptions(tensor_content=True)) as (_, address, _):
        output = stub(address).Predict(image_request(test_digits[:2]), timeout=30).outputs["probabilities"]
        assert output.tensor_content and not output.float_val
        assert tf.make_ndarray(output).shape == (2, 10)
        probabilities, _ = predict_probabilities(test_digits[:2], Target(address))  # our client: tensor_content
        assert np.allclose(probabilities, tf.make_ndarray(output))


def test_output_filter_and_input_checks_as_predict_util(hp2_server) -> None:
    _, address, _ = hp2_server
    request = hp2_predict([2.0, 3.0])
    request.output_filter.extend(["y", "y"])
    error = rpc_error(stub(address).Predict, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "duplicate output tensor alias: y" in error.details()
    request = hp2_predict([2.0])
    request.output_filter.append("z")
    error = rpc_error(stub(address).Predict, request)
    assert "output tensor alias not found in signature: z" in error.details()
    extra = hp2_predict([2.0])
    extra.inputs["x2"].CopyFrom(to_tensor_proto(np.zeros(1)))
    error = rpc_error(stub(address).Predict, extra)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "Sent extra: {x2}" in error.details()
    # values are not inspected (NaN runs through), and an empty batch is a valid batch
    answer = stub(address).Predict(hp2_predict([float("nan"), 2.0]), timeout=30)
    assert np.isnan(answer.outputs["y"].float_val[0]) and answer.outputs["y"].float_val[1] == 3.0
    assert list(stub(address).Predict(hp2_predict([]), timeout=30).outputs["y"].float_val) == []


def test_non_finite_inputs_refused_only_when_asked(saved_model_dir: Path, tmp_path: Path) -> None:
    from serving.inference import PredictOptions

    with served_copy(saved_model_dir, tmp_path, predict=PredictOptions(reject_non_finite=True)) as (_, address, _):
        error = rpc_error(stub(address).Predict, image_request(np.full((1, 28, 28, 1), np.nan, dtype=np.float32)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in error.details()


# --- 2. Error codes (predict_impl.cc, server_core.cc ServableRequestFromModelSpec) ----------------
def test_error_codes_as_tf_serving(hp2_server) -> None:
    _, address, rest = hp2_server
    no_spec = predict_pb2.PredictRequest()
    no_spec.inputs["x"].CopyFrom(to_tensor_proto(np.ones(1)))
    cases = [
        (no_spec, grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"),
        (hp2_predict([1.0], name=""), grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified."),
        (hp2_predict([1.0], version_label="gold"), grpc.StatusCode.INVALID_ARGUMENT,
         "Unrecognized servable version label: gold"),
        (hp2_predict([1.0], signature_name="nope"), grpc.StatusCode.FAILED_PRECONDITION,
         'Serving signature key "nope" not found.'),
        (hp2_predict([1.0], name="fashion"), grpc.StatusCode.NOT_FOUND, "fashion"),
    ]
    for request, code, text in cases:
        error = rpc_error(stub(address).Predict, request)
        assert error.code() == code and text in error.details(), (code, error.details())
    missing_version = hp2_predict([1.0])
    missing_version.model_spec.version.value = 9
    assert rpc_error(stub(address).Predict, missing_version).code() == grpc.StatusCode.NOT_FOUND
    assert httpx.post(f"{rest}/labels/gold:predict", json={"instances": [1.0]}, timeout=30).status_code == 400
    assert httpx.post(f"{rest}/versions/9:predict", json={"instances": [1.0]}, timeout=30).status_code == 404


# --- 3. Classify and Regress (tensorflow_model_server_test.py testClassify*, testRegress*) ------------
def example_request(kind, signature: str, x: float, name: str = "mnist"):
    request = kind()
    request.model_spec.name, request.model_spec.signature_name = name, signature
    request.input.example_list.examples.add().features.feature["x"].float_list.value.append(x)
    return request


def test_classify_and_regress_on_grpc_and_rest(hp2_server, caplog: pytest.LogCaptureFixture) -> None:
    _, address, rest = hp2_server
    classified = stub(address).Classify(example_request(classification_pb2.ClassificationRequest,
                                                        "classify_x_to_y", 2.0), timeout=30)
    assert [c.score for c in classified.result.classifications[0].classes] == [3.0]
    assert classified.model_spec.signature_name == "classify_x_to_y" and classified.model_spec.version.value == 1
    regressed = stub(address).Regress(example_request(regression_pb2.RegressionRequest, "regress_x_to_y", 2.0),
                                      timeout=30)
    assert [r.value for r in regressed.result.regressions] == [3.0]
    assert httpx.post(f"{rest}:classify", json={"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]},
                      timeout=30).json() == {"results": [[["", 3.0]]]}
    assert httpx.post(f"{rest}:regress", json={"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}]},
                      timeout=30).json() == {"results": [3.0]}
    predict_only = rpc_error(stub(address).Classify, example_request(classification_pb2.ClassificationRequest,
                                                                     "serving_default", 2.0))
    assert predict_only.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Expected classification signature method_name to be tensorflow/serving/classify" in predict_only.details()
    unknown = rpc_error(stub(address).Regress, example_request(regression_pb2.RegressionRequest, "regress_x_to_y",
                                                               2.0, name="fashion"))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    multi = rpc_error(stub(address).MultiInference, inference_pb2.MultiInferenceRequest())
    assert multi.code() == grpc.StatusCode.UNIMPLEMENTED
    assert not [r for r in caplog.records if r.exc_info], "no traceback in the server log for any request"


def test_predict_rest_row_and_columnar_as_tf_serving(hp2_server) -> None:
    """tensorflow_model_server_test.py testPredictREST, testPredictColumnarREST."""
    _, _, rest = hp2_server
    assert httpx.post(f"{rest}:predict", json={"instances": [2.0, 3.0, 4.0]}, timeout=30).json() == {
        "predictions": [3.0, 3.5, 4.0]}
    assert httpx.post(f"{rest}:predict", json={"inputs": [2.0, 3.0, 4.0]}, timeout=30).json() == {
        "outputs": [3.0, 3.5, 4.0]}
    # json_tensor.cc FillTensorMapFromInputsMap reads only the signature's inputs: extra keys are ignored
    assert httpx.post(f"{rest}:predict", json={"inputs": {"x": [2.0], "extra": "x"}}, timeout=30).json() == {
        "outputs": [3.0]}


# --- 4. Status and metadata (get_model_status_impl.cc, http_rest_api_util.cc ToJsonString) ----------
def test_rest_status_and_metadata_bodies(hp2_server) -> None:
    """tensorflow_model_server_test.py testGetStatusREST, testGetModelMetadataREST."""
    _, _, rest = hp2_server
    assert httpx.get(rest, timeout=30).json() == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    metadata = httpx.get(f"{rest}/metadata", timeout=30).json()
    assert metadata["model_spec"] == {"name": "mnist", "signature_name": "", "version": "1"}
    signatures = metadata["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "classify_x_to_y", "regress_x_to_y"} <= set(signatures)
    assert signatures["regress_x_to_y"]["method_name"] == "tensorflow/serving/regress"


def status_of(address: str, name: str = "mnist", **spec) -> list[tuple[int, str, int, str]]:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    for key, value in spec.items():
        setattr(request.model_spec, key, value)
    response = model_stub(address).GetModelStatus(request, timeout=30)
    return [(s.version, get_model_status_pb2.ModelVersionStatus.State.Name(s.state), s.status.error_code,
             s.status.error_message) for s in response.model_version_status]


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def test_status_keeps_every_version_known_end_included(mnist_server, saved_model_dir: Path) -> None:
    server, address, base = mnist_server
    shutil.copytree(saved_model_dir, base / "2")
    wait_for(lambda: [v for v, state, *_ in status_of(address)] == [2, 1] and
             status_of(address)[1][1] == "END")
    assert status_of(address) == [(2, "AVAILABLE", 0, ""), (1, "END", 0, "")]  # newest first, as the monitor
    assert status_of(address, version_label="stable") == status_of(address)  # a label does not filter
    only = get_model_status_pb2.GetModelStatusRequest()
    only.model_spec.name = "mnist"
    only.model_spec.version.value = 1
    assert [s.version for s in model_stub(address).GetModelStatus(only, timeout=30).model_version_status] == [1]
    only.model_spec.version.value = 7
    error = rpc_error(model_stub(address).GetModelStatus, only)
    assert error.code() == grpc.StatusCode.NOT_FOUND and "Could not find version 7 of model mnist" in error.details()


def load_failures(caplog: pytest.LogCaptureFixture, version: int) -> int:
    return sum(f"loading mnist version {version} failed" in r.getMessage() for r in caplog.records)


def test_a_failed_load_is_retried_then_given_up_until_the_version_comes_back(
        saved_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """loader_harness.cc Load with util/retrier.cc Retry: 1 + max_num_load_retries tries,
    load_retry_interval_micros apart, LOADING meanwhile, then END with the error.
    aspired_versions_manager.cc: an errored version is not reloaded while it stays aspired
    (the model server leaves enable_reload_servables_with_error off), and is managed anew
    once it has left and come back."""
    retries = LoadRetries(max_retries=2, interval_seconds=1.0)
    with served_copy(saved_model_dir, tmp_path, retries=retries) as (server, address, base):
        broken = base / "3"
        broken.mkdir()
        (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
        wait_for(lambda: load_failures(caplog, 3) >= 1)
        assert load_failures(caplog, 3) < 3 and status_of(address)[0] == (3, "LOADING", 0, "")  # between tries
        assert predict_probabilities(np.zeros((1, 28, 28, 1), np.float32), Target(address))[1] == 1  # 1 serves
        wait_for(lambda: status_of(address)[0][:2] == (3, "END"))
        version, state, code, message = status_of(address)[0]
        assert code == grpc.StatusCode.UNKNOWN.value[0] and message and load_failures(caplog, 3) == 3

        shutil.copytree(saved_model_dir, broken, dirs_exist_ok=True)  # mended in place: not tried again
        time.sleep(1.5)
        assert load_failures(caplog, 3) == 3 and status_of(address)[0][:2] == (3, "END")
        assert predict_probabilities(np.zeros((1, 28, 28, 1), np.float32), Target(address))[1] == 1

        shutil.move(broken, tmp_path / "aside")  # gone for a poll, then back: loaded afresh
        wait_for(lambda: not server.manager.failed_loads)
        shutil.move(tmp_path / "aside", broken)
        wait_for(lambda: status_of(address)[0][:2] == (3, "AVAILABLE"))
        assert predict_probabilities(np.zeros((1, 28, 28, 1), np.float32), Target(address))[1] == 3


def test_version_directories_are_read_as_tf_serving_reads_them(saved_model_dir: Path, tmp_path: Path) -> None:
    """file_system_storage_path_source.cc: a child is a version when its name reads as a number
    (absl::SimpleAtoi, so zero-padded names count, as in TF Serving's own test models), and a
    symbolic link to a SavedModel is followed."""
    with served_copy(saved_model_dir, tmp_path) as (server, address, base):
        shutil.copytree(saved_model_dir, tmp_path / "padded")
        (tmp_path / "padded").rename(base / "00000002")
        wait_for(lambda: status_of(address)[0][:2] == (2, "AVAILABLE"))
        assert predict_probabilities(np.zeros((1, 28, 28, 1), np.float32), Target(address))[1] == 2
        (base / "3").symlink_to(saved_model_dir, target_is_directory=True)
        wait_for(lambda: status_of(address)[0][:2] == (3, "AVAILABLE"))
        assert [version for version, *_ in status_of(address)] == [3, 2, 1]
        (base / "not-a-version").mkdir()  # skipped, as there
        time.sleep(0.5)
        assert predict_probabilities(np.zeros((1, 28, 28, 1), np.float32), Target(address))[1] == 3


# --- 5. REST errors (http_rest_api_handler.cc ProcessRequest, json_tensor.cc) ----------------------
def test_every_malformed_rest_request_is_a_400_with_an_error(hp2_server) -> None:
    _, _, rest = hp2_server
    root = rest.rsplit("/v1/", 1)[0]
    cases = [
        httpx.post(f"{rest}:predict", content=b"[1, 2]", timeout=30),  # body not an object
        httpx.post(f"{rest}:predict", json={"instances": 5}, timeout=30),
        httpx.post(f"{rest}:predict", json={"instances": []}, timeout=30),
        httpx.post(f"{rest}:predict", json={"instances": [1.0], "signature_name": 7}, timeout=30),
        httpx.post(f"{rest}:predict", json={"instances": [1.0], "inputs": [1.0]}, timeout=30),
        httpx.post(f"{rest}:predict", content=b"{not json", timeout=30),
        httpx.post(f"{rest}:explain", json={"instances": [1.0]}, timeout=30),
        httpx.get(f"{root}/v2/health", timeout=30),
        httpx.get(f"{root}/v1/models", timeout=30),
        httpx.put(rest, json={}, timeout=30),
        httpx.delete(rest, timeout=30),
        httpx.post(f"{rest}:predict", json={"instances": [1.0], "signature_name": "nope"}, timeout=30),
    ]
    for response in cases:
        assert response.status_code == 400, (response.request.method, response.request.url, response.text)
        assert response.json()["error"]


# --- 6. ReloadConfig (model_service_impl.cc, server_core.cc ReloadConfig, UpdateModelVersionLabelMap) ---
def reload_error(address: str, config) -> grpc.RpcError:
    request = model_management_pb2.ReloadConfigRequest()
    request.config.CopyFrom(config)
    return rpc_error(model_stub(address).HandleReloadConfigRequest, request)


def test_a_refused_config_changes_nothing_and_is_the_rpc_status(mnist_server, saved_model_dir: Path) -> None:
    server, address, base = mnist_server
    good = single_model_config("mnist", base.resolve())
    good.model_config_list.config[0].version_labels["stable"] = 1
    request = model_management_pb2.ReloadConfigRequest(config=good)
    model_stub(address).HandleReloadConfigRequest(request, timeout=30)
    before = (status_of(address), dict(server.manager.labels))
    duplicate = single_model_config("mnist", base.resolve())
    duplicate.model_config_list.config.add().CopyFrom(duplicate.model_config_list.config[0])
    relative = single_model_config("mnist", Path("models/mnist"))
    not_a_list = type(good)()
    not_a_list.custom_model_config.SetInParent()
    shutil.copytree(saved_model_dir, base / "5")
    unavailable = single_model_config("mnist", base.resolve())
    unavailable.model_config_list.config[0].model_version_policy.specific.versions.extend([1, 5])
    unavailable.model_config_list.config[0].version_labels["stable"] = 5
    cases = [(duplicate, grpc.StatusCode.INVALID_ARGUMENT, "Illegal to list model mnist multiple times"),
             (relative, grpc.StatusCode.INVALID_ARGUMENT, "to have an absolute path or URI"),
             (not_a_list, grpc.StatusCode.INVALID_ARGUMENT, "Only ModelConfigList is currently supported"),
             (unavailable, grpc.StatusCode.FAILED_PRECONDITION,
              "Request to assign label to version 5 of model mnist, which is not currently available")]
    for config, code, text in cases:
        error = reload_error(address, config)
        assert error.code() == code and text in error.details(), error.details()
        assert (status_of(address), dict(server.manager.labels)) == before  # untouched
    assert predict_probabilities(np.zeros((1, 28, 28, 1), np.float32), Target(address, label="stable"))[1] == 1


def test_labels_for_unavailable_models_still_refuse_moving_a_label_in_use(saved_model_dir: Path,
                                                                       tmp_path: Path) -> None:
    """server_core.cc: with --allow_version_labels_for_unavailable_models a new label may name
    a version still loading, but a label that points elsewhere moves only to an AVAILABLE one."""
    from serving.manager import ModelManager
    from serving.model_config import ConfigRefused

    base = tmp_path / "m"
    shutil.copytree(saved_model_dir, base / "1")
    config = single_model_config("mnist", base.resolve())
    config.model_config_list.config[0].version_labels["stable"] = 1
    manager = ModelManager(config, allow_version_labels_for_unavailable_models=True)  # at start: allowed
    assert manager.labels == {"mnist": {"stable": 1}}
    config.model_config_list.config[0].version_labels["stable"] = 2
    with pytest.raises(ConfigRefused, match="version 2 of model mnist"):
        manager.apply_config(config)
    assert manager.labels == {"mnist": {"stable": 1}}
    with pytest.raises(ConfigRefused):
        ModelManager(config)  # the default, as TF Serving: no label on a version not AVAILABLE


@pytest.fixture(scope="module")
def test_digits(prepared_path: Path) -> np.ndarray:
    from tasks.data import load_test_set

    return load_test_set(prepared_path)[0][:8]


def test_metadata_request_checks(hp2_server) -> None:
    """get_model_metadata_impl.cc ValidateGetModelMetadataRequest."""
    _, address, _ = hp2_server
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "mnist"
    assert "at least one metadata_field" in rpc_error(stub(address).GetModelMetadata, request).details()
    request.metadata_field.append("graph")
    assert "Metadata field graph is not supported" in rpc_error(stub(address).GetModelMetadata, request).details()


# --- 7. Loading (saved_model_warmup_util.cc, predict_util.cc VerifySignature, --saved_model_tags) ------
def counting_model(directory: Path) -> Path:
    """A SavedModel with the digit model's signature that counts its calls in a variable."""
    class Counting(tf.Module):
        def __init__(self):
            super().__init__()
            self.calls = tf.Variable(0, dtype=tf.int64)

        @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32, name="image")])
        def serve(self, image):
            self.calls.assign_add(1)
            return {"probabilities": tf.zeros([tf.shape(image)[0], 10])}

    module = Counting()
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})
    return directory


def test_warmup_iterations_and_record_limit_as_tf_serving(tmp_path: Path, test_digits) -> None:
    from serving.manager import LoadOptions, load_version
    from tasks.export import write_warmup_requests

    model = counting_model(tmp_path / "1")
    write_warmup_requests(model, test_digits, batch_sizes=(1, 2))
    assert load_version(model, 1, LoadOptions(warmup_iterations=3)).module.calls.numpy() == 6  # 2 records x 3
    assert load_version(model, 1, LoadOptions(warmup_iterations=0)).module.calls.numpy() == 0  # warmup off
    write_warmup_requests(model, test_digits, batch_sizes=(1,) * 1001)  # one record more than TF Serving takes
    with pytest.raises(ValueError, match=r"Number of warmup records exceeds the maximum \(1000\) at "):
        load_version(model, 1)
    with pytest.raises(ValueError, match=r"incompatible argument to `tags`: \['serve', 'tpu'\]"):  # no such MetaGraph
        load_version(model, 1, LoadOptions(tags=frozenset({"serve", "tpu"}), warmup_iterations=0))


def test_signature_method_name_checked_only_with_the_flag(half_plus_two: Path, tmp_path: Path) -> None:
    from tensorflow.core.protobuf import saved_model_pb2

    from serving.inference import PredictOptions

    base = tmp_path / "models"
    shutil.copytree(half_plus_two, base / "1")
    saved_model = saved_model_pb2.SavedModel.FromString((base / "1" / "saved_model.pb").read_bytes())
    saved_model.meta_graphs[0].signature_def["serving_default"].method_name = "custom/method"
    (base / "1" / "saved_model.pb").write_bytes(saved_model.SerializeToString())
    for check in (False, True):
        server, address = start_model_server(base, predict=PredictOptions(method_name_check=check))
        try:
            if not check:
                assert list(stub(address).Predict(hp2_predict([2.0]), timeout=30).outputs["y"].float_val) == [3.0]
                continue
            error = rpc_error(stub(address).Predict, hp2_predict([2.0]))
            assert error.code() == grpc.StatusCode.INTERNAL
            assert error.details() == ("Expected prediction signature method_name to be one of {tensorflow/serving/"
                                       "predict, tensorflow/serving/classify, tensorflow/serving/regress}. Was: "
                                       "custom/method")
        finally:
            server.stop(grace=1)


def test_a_rest_port_equal_to_the_grpc_port_serves_grpc_alone(saved_model_dir: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """server.cc BuildAndStart: the REST API is skipped, with an error line, and gRPC serves."""
    from serving.manager import ModelManager
    from serving.server import ModelServer, ServerOptions

    base = tmp_path / "models" / "mnist"
    shutil.copytree(saved_model_dir, base / "1")
    port = free_port()
    server = ModelServer(ModelManager(single_model_config("mnist", base.resolve())),
                         ServerOptions(port=port, rest_api_port=port)).start()
    try:
        assert server.rest is None
        assert any("http_port cannot be same as grpc_port" in record.getMessage() for record in caplog.records)
        assert predict_probabilities(np.zeros((1, 28, 28, 1), np.float32), Target(f"127.0.0.1:{port}"))[1] == 1
    finally:
        server.stop(grace=1)
