"""``mnist serve`` against TF Serving's own behaviour over a model's versions: how they are found
on disk, loaded (warmup, tags, retries), reported, labelled and reconfigured, and how the server
starts. Each test names the TF Serving source it follows."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2, model_management_pb2

from mnist_client.client import Target, predict_probabilities
from serving.model_server.manager import LoadRetries
from serving.model_server.model_config import single_model_config
from storage.embedded import free_port
from tests.tf_serving_cases import (  # noqa: F401  fixtures, used by name
    mnist_server,
    model_stub,
    rpc_error,
    served_copy,
    status_of,
    test_digits,
    wait_for,
)


# --- 1. Versions on disk and their states (file_system_storage_path_source.cc, loader_harness.cc) ---
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


# --- 2. ReloadConfig (model_service_impl.cc, server_core.cc ReloadConfig, UpdateModelVersionLabelMap) ---
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
    from serving.model_server.manager import ModelManager
    from serving.model_server.model_config import ConfigRefused

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


# --- 3. Loading (saved_model_warmup_util.cc, --saved_model_tags) ----------------------------------------
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
    from serving.model_server.manager import LoadOptions, load_version
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


# --- 4. Start (server.cc BuildAndStart) ------------------------------------------------------------
def test_a_rest_port_equal_to_the_grpc_port_serves_grpc_alone(saved_model_dir: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """server.cc BuildAndStart: the REST API is skipped, with an error line, and gRPC serves."""
    from serving.model_server.manager import ModelManager
    from serving.model_server.server import ModelServer, ServerOptions

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


def test_a_config_file_that_does_not_parse_stops_the_start_in_tf_servings_words(tmp_path: Path) -> None:
    """tensorflow_model_server_test.py testBadModelConfig: the start fails, and stderr holds
    "Error parsing text-format tensorflow.serving.ModelServerConfig" (proto_util.h ParseProtoTextFile)."""
    from tests.conftest import run_mnist

    bad = tmp_path / "bad.config"
    bad.write_text("model_config_list {\n  config {\n    name: 'mnist'\n    base_path: '/tmp/none'\n"
                   "    no_such_field: 1\n  }\n}\n")
    result = run_mnist("serve", "--model_config_file", str(bad), "--port", "0", timeout=120)
    assert result.returncode != 0
    line = next(line for line in result.stderr.splitlines() if line.startswith("mnist serve:"))
    assert "Error parsing text-format tensorflow.serving.ModelServerConfig: 5:5" in line
    assert f"Invalid protobuf file: '{bad}'" in line


def test_a_reload_during_a_poll_loads_a_new_version_once(saved_model_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The poll thread and a config reload (HandleReloadConfigRequest, or the config file's poll) both
    follow the disk: run at once, each used to load the same new version, and one load was lost."""
    import threading

    from serving.model_server import manager as manager_module
    from serving.model_server.manager import ModelManager

    base = tmp_path / "m"
    shutil.copytree(saved_model_dir, base / "1")
    config = single_model_config("mnist", base.resolve())
    manager = ModelManager(config)
    loads: list[int] = []
    real_load = manager_module.load_version

    def slow_load(path, version, *args):
        loads.append(version)
        time.sleep(0.5)  # a load takes a while: wide enough for the two to meet
        return real_load(path, version, *args)

    monkeypatch.setattr(manager_module, "load_version", slow_load)
    shutil.copytree(saved_model_dir, base / "2")
    both = [threading.Thread(target=manager.poll), threading.Thread(target=manager.apply_config, args=(config,))]
    for thread in both:
        thread.start()
    for thread in both:
        thread.join(60)
    assert loads == [2], loads
    assert sorted(manager.models["mnist"].versions) == [2]
    assert manager.version_states("mnist")[2].state == manager_module.State.AVAILABLE
