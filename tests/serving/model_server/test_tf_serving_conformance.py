"""``mnist serve`` against TF Serving's own behaviour, request by request: what Predict, Classify,
Regress, metadata and the REST API answer. Each test names the TF Serving source or test
(tensorflow/serving, 2.21) that it follows; how versions are found, loaded and labelled is in
``test_tf_serving_versions.py``."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    inference_pb2,
    predict_pb2,
    regression_pb2,
)

from mnist_client.client import Target, predict_probabilities
from serving.model_server.tensors import to_tensor_proto
from tests.conftest import start_model_server
from tests.tf_serving_cases import (  # noqa: F401  fixtures, used by name
    half_plus_two,
    hp2_predict,
    hp2_server,
    image_request,
    mnist_server,
    rpc_error,
    served_copy,
    stub,
    test_digits,
)


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
    from serving.model_server.inference import PredictOptions

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


def test_typed_values_fill_or_cut_to_the_shape_as_tensor_from_proto(hp2_server) -> None:
    """TF Serving parses a request tensor with Tensor::FromProto (tensor.cc FromProtoField): fewer
    typed values than the shape holds are filled with the last, more are cut to the shape. A shape
    of 2**40 values filled from none is refused here rather than allocated."""
    _, address, _ = hp2_server

    def predict(shape: list[int], values: list[float]) -> list[float]:
        request = hp2_predict([])
        request.inputs["x"].ClearField("tensor_content")
        del request.inputs["x"].tensor_shape.dim[:]
        request.inputs["x"].tensor_shape.dim.add().size = shape[0]
        request.inputs["x"].float_val.extend(values)
        return list(stub(address).Predict(request, timeout=30).outputs["y"].float_val)

    assert predict([3], [2.0, 4.0]) == [3.0, 4.0, 4.0]
    assert predict([2], [2.0, 4.0, 6.0]) == [3.0, 4.0]
    assert predict([2], []) == [2.0, 2.0]
    with pytest.raises(grpc.RpcError) as huge:
        predict([2**40], [])
    assert huge.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "more than" in huge.value.details()
    # shapes numpy cannot hold are a line, not INTERNAL: past 64 dimensions; an int64 overflow (TensorFlow
    # refuses it too); empty but with a dimension past what numpy can address (TensorFlow takes that one)
    for sizes, words in (([1] * 70, "70 dimensions"), ([2**62, 4, 0], "overflows"), ([0, 2**62], "cannot be held")):
        odd = hp2_predict([])
        del odd.inputs["x"].tensor_shape.dim[:]
        for size in sizes:
            odd.inputs["x"].tensor_shape.dim.add().size = size
        refused = rpc_error(stub(address).Predict, odd)
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and words in refused.details(), refused.details()


def test_non_finite_inputs_refused_only_when_asked(saved_model_dir: Path, tmp_path: Path) -> None:
    from serving.model_server.inference import PredictOptions

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
    assert "No classification inputs found in SignatureDef" in predict_only.details()  # classifier.cc
    unknown = rpc_error(stub(address).Regress, example_request(regression_pb2.RegressionRequest, "regress_x_to_y",
                                                               2.0, name="fashion"))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    multi = rpc_error(stub(address).MultiInference, inference_pb2.MultiInferenceRequest())
    assert multi.code() == grpc.StatusCode.INVALID_ARGUMENT  # no task names a model (multi_inference.cc)
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


def test_rest_values_are_read_and_written_as_json_tensor(hp2_server) -> None:
    """json_tensor.cc on the wire (json_tensor_test.cc has the cases, test_json_tensor.py each one):
    a float32 answer in WriteDecimal's digits, a value of the wrong JSON type refused."""
    _, _, rest = hp2_server
    answer = httpx.post(f"{rest}:predict", content=b'{"instances": [0.1, 1e9]} ', timeout=30)
    assert answer.status_code == 200 and "[2.05, 5e+08]" in answer.text, answer.text  # not 2.049999952316284
    regressed = httpx.post(f"{rest}:regress", json={"signature_name": "regress_x_to_y", "examples": [{"x": 0.1}]},
                           timeout=30)
    assert "[2.05]" in regressed.text, regressed.text
    for wrong in ('"1.0"', "true", "null", '{"b64": "AA=="}'):  # numpy's reading took the first two as 1.0
        refused = httpx.post(f"{rest}:predict", content=b'{"instances": [%s]}' % wrong.encode(), timeout=30)
        assert refused.status_code == 400, (wrong, refused.text)
        assert "Failed to process element: 0 of 'instances' list" in refused.json()["error"]


def test_rest_bodies_gzipped_or_chunked_as_net_http_takes_them(hp2_server) -> None:
    """evhttp_request.cc: a Content-Encoding: gzip body is decompressed (auto_uncompress_input is on
    by default), and libevent reads chunked bodies; a body that is not the gzip it claims is refused."""
    _, _, rest = hp2_server
    body = json.dumps({"instances": [2.0, 3.0]}).encode()
    gzipped = httpx.post(f"{rest}:predict", content=gzip.compress(body), headers={"Content-Encoding": "gzip"},
                         timeout=30)
    chunked = httpx.post(f"{rest}:predict", content=iter([body[:7], body[7:]]), timeout=30)
    assert chunked.request.headers["transfer-encoding"] == "chunked"
    for reply in (gzipped, chunked):
        assert reply.status_code == 200 and reply.json() == {"predictions": [3.0, 3.5]}, reply.text
    broken = httpx.post(f"{rest}:predict", content=body, headers={"Content-Encoding": "gzip"}, timeout=30)
    assert broken.status_code == 400 and "gzip" in broken.json()["error"]


def test_rest_paths_read_as_parse_model_info(hp2_server) -> None:
    """http_rest_api_util_test.cc TestParseModelInfoForGet/ForPost: the name and label are
    percent-decoded (curl's unescape); a version must fit an int64."""
    _, _, rest = hp2_server
    root = rest.rsplit("/mnist", 1)[0]
    assert httpx.post(f"{root}/mn%69st:predict", json={"instances": [2.0]}, timeout=30).json() == {
        "predictions": [3.0]}
    assert httpx.get(f"{root}/mn%69st/versions/1/metadata", timeout=30).json()["model_spec"]["name"] == "mnist"
    unknown_label = httpx.post(f"{root}/mnist/labels/st%61ble:predict", json={"instances": [2.0]}, timeout=30)
    assert unknown_label.status_code == 400 and unknown_label.json()["error"].endswith("label: stable")
    huge = httpx.get(f"{root}/mnist/versions/99999999999999999999", timeout=30)
    assert huge.status_code == 400 and huge.json() == {
        "error": "Failed to convert version: 99999999999999999999 to numeric."}


# --- 4. Status and metadata bodies (get_model_status_impl.cc, http_rest_api_util.cc ToJsonString) ----------
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
        httpx.get(f"{root}/v1/models", timeout=30),
        httpx.put(rest, json={}, timeout=30),
        httpx.delete(rest, timeout=30),
        httpx.post(f"{rest}:predict", json={"instances": [1.0], "signature_name": "nope"}, timeout=30),
    ]
    for response in cases:
        assert response.status_code == 400, (response.request.method, response.request.url, response.text)
        assert response.json()["error"]
    # outside /v1/ (http_rest_api_handler.h kPathRegex) no dispatcher takes a request: evhttp_server.cc's 404
    for outside in (httpx.get(f"{root}/v2/health", timeout=30), httpx.post(f"{root}/predict", json={}, timeout=30),
                    httpx.options(f"{root}/v2/models", headers={"Origin": "https://app.example"}, timeout=30)):
        assert outside.status_code == 404, (outside.request.url, outside.text)


# --- 6. Metadata requests and signature checks (get_model_metadata_impl.cc, predict_util.cc) --------
def test_metadata_request_checks(hp2_server) -> None:
    """get_model_metadata_impl.cc ValidateGetModelMetadataRequest."""
    _, address, _ = hp2_server
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "mnist"
    assert "at least one metadata_field" in rpc_error(stub(address).GetModelMetadata, request).details()
    request.metadata_field.append("graph")
    assert "Metadata field graph is not supported" in rpc_error(stub(address).GetModelMetadata, request).details()


def test_signature_method_name_checked_only_with_the_flag(half_plus_two: Path, tmp_path: Path) -> None:
    from tensorflow.core.protobuf import saved_model_pb2

    from serving.model_server.inference import PredictOptions

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


# --- 7. What TF Serving's own tensorflow_model_server_test.py relies on ---------------------------------
@pytest.fixture(scope="module")
def tf_serving_testdata(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.half_plus_two import export_half_plus_two

    return export_half_plus_two(tmp_path_factory.mktemp("hp2-testdata") / "model" / "1", as_tf_serving_testdata=True)


@pytest.fixture()
def testdata_server(tf_serving_testdata: Path, tmp_path: Path):
    from tests.tf_serving_cases import served_with_rest

    with served_with_rest(tf_serving_testdata, tmp_path / "testdata") as (_, address, rest):
        yield address, rest


def test_request_shapes_are_left_to_the_model_as_tf_serving_leaves_them(testdata_server) -> None:
    """testPredictSavedModel, testPredictREST, testPredictColumnarREST, testGoodModelConfig...: x as
    shape [3] into a signature declaring [-1, 1]. predict_util.cc checks names, sizes and dtypes,
    never shapes against the TensorInfo; the graph runs it."""
    address, rest = testdata_server
    request = hp2_predict([2.0, 3.0, 4.0])
    request.model_spec.signature_name = "x_column"
    answered = stub(address).Predict(request, timeout=30)
    assert list(answered.outputs["y"].float_val) == [3.0, 3.5, 4.0]
    columnar = httpx.post(f"{rest}:predict", json={"signature_name": "x_column", "inputs": [2.0, 3.0, 4.0]},
                          timeout=30)
    assert columnar.status_code == 200 and columnar.json() == {"outputs": [3.0, 3.5, 4.0]}


def test_classify_and_regress_on_tf2_signatures_named_predict(testdata_server) -> None:
    """testClassifyTf2, testRegressTf2 (classifier.cc, regressor.cc): the method name is checked only
    with --enable_signature_method_name_check; without it, the signature's shape decides."""
    address, _ = testdata_server
    classified = stub(address).Classify(example_request(classification_pb2.ClassificationRequest, "classify_tf2",
                                                        2.0), timeout=30)
    regressed = stub(address).Regress(example_request(regression_pb2.RegressionRequest, "regress_tf2", 2.0),
                                      timeout=30)
    assert classified.result.classifications[0].classes[0].score == 3.0 and regressed.result.regressions[0].value == 3.0


def test_a_tf_1_0_saved_model_is_served_through_a_session_as_tf_serving_serves_it(tmp_path: Path) -> None:
    """testGoodModelConfig, testModelConfigReload (saved_model_half_plus_three, written by TF 1.0):
    an empty placeholder shape meant "unknown" then and means a scalar now, so tf.saved_model.load
    refuses the graph (ParseExample wants a vector); TF Serving loads every SavedModel into a
    Session (saved_model_bundle_factory.cc), which imports it, and so does this server for a TF1
    SavedModel that tf.saved_model.load refuses."""
    import tensorflow as tf

    from tests.half_plus_two import export_half_plus_three_as_tf_1_0
    from tests.tf_serving_cases import served_with_rest

    model = export_half_plus_three_as_tf_1_0(tmp_path / "hp3" / "123")
    with pytest.raises(ValueError, match="rank"):  # a TensorInfo without a shape read as a scalar
        tf.saved_model.load(str(model))
    with served_with_rest(model, tmp_path / "served") as (_, address, rest):
        assert list(stub(address).Predict(hp2_predict([2.0]), timeout=30).outputs["y"].float_val) == [4.0]
        regressed = stub(address).Regress(example_request(regression_pb2.RegressionRequest, "regress_x_to_y", 2.0),
                                          timeout=30)
        assert regressed.result.regressions[0].value == 4.0
        assert httpx.post(f"{rest}:predict", json={"instances": [[2.0], [6.0]]}, timeout=30).json() == {
            "predictions": [[4.0], [6.0]]}


def test_multi_inference_answers_classify_and_regress_tasks_together(testdata_server) -> None:
    """testMultiInference, testMultiInferenceTf2 (multi_inference.cc): tasks on one model's version,
    one input of examples; the same signature twice, or two models, are refused."""
    address, _ = testdata_server
    request = inference_pb2.MultiInferenceRequest()
    for signature, method in (("regress_x_to_y", "tensorflow/serving/regress"),
                              ("classify_tf2", "tensorflow/serving/classify")):
        task = request.tasks.add()
        task.model_spec.name, task.model_spec.signature_name, task.method_name = "mnist", signature, method
    request.input.example_list.examples.add().features.feature["x"].float_list.value.append(2.0)
    answered = stub(address).MultiInference(request, timeout=30)
    assert answered.results[0].regression_result.regressions[0].value == 3.0
    assert answered.results[1].classification_result.classifications[0].classes[0].score == 3.0
    assert [(r.model_spec.signature_name, r.model_spec.version.value) for r in answered.results] == [
        ("regress_x_to_y", 1), ("classify_tf2", 1)]
    request.tasks[1].model_spec.signature_name = "regress_x_to_y"
    twice = rpc_error(stub(address).MultiInference, request)
    assert twice.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert twice.details() == "Duplicate evaluation of signature: regress_x_to_y"
    request.tasks[1].model_spec.signature_name, request.tasks[1].model_spec.name = "classify_tf2", "other"
    other = rpc_error(stub(address).MultiInference, request)
    assert other.details() == "All ModelSpecs in a MultiInferenceRequest must access the same model name."
