"""The TensorFlow-free client: stubs generated from TF Serving 2.21's protos and kept up to date,
byte-for-byte wire compatibility with tensorflow-serving-api, and round robin over replicas
that rides out one of them going away."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.conftest import REPO, start_model_server, wait_for

CLIENT = REPO / "clients" / "python"


def test_the_committed_stubs_are_what_the_script_generates(tmp_path: Path) -> None:
    # In its own process, as a person runs it: grpc_tools' protoc must not share this process's
    # native protobuf with TensorFlow's.
    subprocess.run([sys.executable, str(CLIENT / "generate_protos.py"), str(tmp_path / "generated")], check=True,
                   capture_output=True, timeout=300)
    committed = CLIENT / "mnist_client" / "_generated"
    names = sorted(p.relative_to(committed).as_posix() for p in committed.rglob("*.py"))
    assert names == sorted(p.relative_to(tmp_path / "generated").as_posix()
                           for p in (tmp_path / "generated").rglob("*.py"))
    stale = [name for name in names if (committed / name).read_text() != (tmp_path / "generated" / name).read_text()]
    assert not stale, f"regenerate with: python clients/python/generate_protos.py ({stale[:3]})"


def test_importing_the_client_imports_no_tensorflow() -> None:
    check = ("import sys, mnist_client, mnist_client.images; "
             "assert not [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_serving', 'keras')]")
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True).returncode == 0


def test_messages_round_trip_byte_for_byte_with_tensorflow_serving_api() -> None:
    from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

    from mnist_client.protos import get_model_metadata_pb2 as light_metadata
    from mnist_client.protos import get_model_status_pb2 as light_status
    from mnist_client.protos import predict_pb2 as light_predict
    from mnist_client.tensors import to_tensor_proto

    request = light_predict.PredictRequest()
    request.model_spec.name, request.model_spec.version_label = "mnist", "stable"
    request.inputs["image"].CopyFrom(to_tensor_proto(np.random.default_rng(0).random((2, 28, 28, 1), np.float32)))
    request.output_filter.append("probabilities")
    response = light_predict.PredictResponse()
    response.model_spec.version.value = 7
    response.outputs["probabilities"].CopyFrom(to_tensor_proto(np.eye(10, dtype=np.float32)[:2], as_content=False))
    metadata = light_metadata.GetModelMetadataResponse()
    signatures = light_metadata.SignatureDefMap()
    signatures.signature_def["serving_default"].inputs["image"].dtype = 1
    signatures.signature_def["serving_default"].method_name = "tensorflow/serving/predict"
    metadata.metadata["signature_def"].Pack(signatures)
    status = light_status.GetModelStatusResponse()
    entry = status.model_version_status.add()
    entry.version, entry.state, entry.status.error_message = 3, 30, "ok"
    pairs = [(request, predict_pb2.PredictRequest), (response, predict_pb2.PredictResponse),
             (metadata, get_model_metadata_pb2.GetModelMetadataResponse),
             (status, get_model_status_pb2.GetModelStatusResponse)]
    for light, full_class in pairs:
        wire = light.SerializeToString(deterministic=True)
        full = full_class.FromString(wire)
        assert full.SerializeToString(deterministic=True) == wire
        assert type(light).FromString(full.SerializeToString(deterministic=True)) == light
        assert light.DESCRIPTOR.full_name == full.DESCRIPTOR.full_name
        assert [f.number for f in light.DESCRIPTOR.fields] == [f.number for f in full.DESCRIPTOR.fields]


def test_round_robin_over_two_replicas_rides_out_one_going_away(saved_model_dir: Path, tmp_path: Path) -> None:
    from mnist_client import Target, predict_probabilities, signature_io
    from mnist_client.client import open_channel

    servers = []
    for version in (1, 2):  # replica a serves version 1, replica b version 2: answers tell them apart
        base = tmp_path / f"replica-{version}" / "mnist"
        shutil.copytree(saved_model_dir, base / str(version))
        servers.append(start_model_server(base))
    target = Target([address for _, address in servers], timeout=10)
    images = np.zeros((1, 28, 28, 1), np.float32)
    failures: list[str] = []
    calls = 0
    with open_channel(target) as channel:
        answered_by = [signature_io(channel, target)[2] for _ in range(10)]  # one RPC each
        assert set(answered_by) == {1, 2}  # calls go to each replica in turn
        # a replica going away as an orchestrator stops one: in-flight calls finish, new ones go elsewhere
        stop_one = threading.Timer(0.5, lambda: servers[0][0].stop(grace=1))
        stop_one.start()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                predict_probabilities(images, target, channel)
                calls += 1
            except Exception as error:  # noqa: BLE001  counted: no call may fail past its retries
                failures.append(str(error))
        stop_one.join()
    servers[1][0].stop(grace=1)
    assert failures == [] and calls > 20


def test_a_list_of_names_is_refused_with_the_way_to_use_dns() -> None:
    from mnist_client import ServingError
    from mnist_client.client import channel_target

    assert channel_target(["127.0.0.1:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("dns:///serving.internal:8500") == "dns:///serving.internal:8500"
    with pytest.raises(ServingError, match="dns:///"):
        channel_target(["serving-a:8500", "serving-b:8500"])


WITHOUT_NUMPY = """
import json, sys
sys.modules["numpy"] = None  # as in a service that installed the client alone: importing numpy fails
from mnist_client import predict, predict_call, Target
digits = json.load(open(sys.argv[2]))
answers = predict(digits, address=sys.argv[1])
probabilities = predict_call(digits, Target(sys.argv[1])).probabilities
assert "numpy" not in [name.split(".")[0] for name in sys.modules if sys.modules[name] is not None]
print(json.dumps({"answers": answers, "probabilities": probabilities}))
"""


def test_the_client_answers_without_numpy_as_it_does_with_it(saved_model_dir: Path, tmp_path: Path,
                                                              prepared_path: Path) -> None:
    """grpcio and protobuf alone (the client's only dependencies): nested lists in, lists of rows out,
    the same answers as with numpy arrays."""
    import json

    from mnist_client import predict
    from tasks.data import load_test_set

    images = load_test_set(prepared_path)[0][:5]
    (tmp_path / "digits.json").write_text(json.dumps(images.tolist()))
    base = tmp_path / "models" / "mnist"
    shutil.copytree(saved_model_dir, base / "1")
    server, address = start_model_server(base)
    try:
        plain = subprocess.run([sys.executable, "-c", WITHOUT_NUMPY, address, str(tmp_path / "digits.json")],
                               capture_output=True, text=True, timeout=120)
        with_numpy = predict(images, address=address)
    finally:
        server.stop(grace=1)
    assert plain.returncode == 0, plain.stderr[-2000:]
    result = json.loads(plain.stdout)
    assert [a["digit"] for a in result["answers"]] == [a["digit"] for a in with_numpy]
    assert all(abs(a["confidence"] - b["confidence"]) < 1e-6 for a, b in zip(result["answers"], with_numpy))
    assert len(result["probabilities"]) == 5 and all(len(row) == 10 for row in result["probabilities"])


def export_renamed(saved_model_dir: Path, destination: Path) -> None:
    """The same network as a SavedModel whose signature names its tensors otherwise."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model_dir))
    serve = loaded.signatures["serving_default"]

    class Renamed(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = loaded

        @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32)])
        def pixels_to_scores(self, pixels):
            return {"scores": serve(image=pixels)["probabilities"]}

    module = Renamed()
    tf.saved_model.save(module, str(destination), signatures={"serving_default": module.pixels_to_scores})


def test_calls_share_a_channel_ask_the_names_once_and_follow_a_rename(saved_model_dir: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A service calling predict() per request: GetModelMetadata once for the spec, not once a
    call; a version whose signature names its tensors otherwise is followed (the server's
    "alias not found in signature" makes the client ask again, once); and a kept channel whose
    server went away and came back answers again within its retries."""
    import mnist_client.client as client
    from mnist_client import predict
    from mnist_client.client import Target, model_status, wait_until_available
    from serving.model_server.server import PredictionService

    asked: list[str] = []
    original = PredictionService.GetModelMetadata
    monkeypatch.setattr(PredictionService, "GetModelMetadata",
                        lambda self, request, context: asked.append(request.model_spec.name)
                        or original(self, request, context))
    monkeypatch.setattr(client, "_tensor_names", {})  # names cached by earlier tests on reused ports
    base = tmp_path / "models" / "mnist"
    shutil.copytree(saved_model_dir, base / "1")
    server, address = start_model_server(base)
    images = np.zeros((2, 28, 28, 1), np.float32)
    try:
        for _ in range(5):
            assert [answer["version"] for answer in predict(images, address=address)] == [1, 1]
        assert asked == ["mnist"]

        export_renamed(saved_model_dir, base / "2")  # latest-1 policy: 2 replaces 1
        assert wait_until_available(Target(address), [2], 60).get(2) == "AVAILABLE"
        wait_for(lambda: dict(model_status(Target(address))).get(1) == "END")
        assert [answer["version"] for answer in predict(images, address=address)] == [2, 2]
        assert asked == ["mnist", "mnist"]
    finally:
        server.stop(grace=0)
    port = int(address.rsplit(":", 1)[1])
    with pytest.raises(client.ServingError):
        predict(images, address=address, timeout=2)  # the kept channel finds nobody there...
    time.sleep(3)  # ...and is down long enough for gRPC's own reconnect backoff to have grown past 2 s
    from serving.model_server.manager import ModelManager
    from serving.model_server.model_config import single_model_config
    from serving.model_server.server import ModelServer, ServerOptions

    again = ModelServer(ModelManager(single_model_config("mnist", base.resolve())),
                        ServerOptions(port=port, poll_seconds=0.2)).start()
    try:
        wait_for(lambda: dict(model_status(Target(address))).get(2) == "AVAILABLE")
        assert [answer["version"] for answer in predict(images, address=address)] == [2, 2]
    finally:
        again.stop(grace=0)


def test_waiting_for_a_label_follows_the_config_that_names_it(saved_model_dir: Path, tmp_path: Path) -> None:
    """A version answers before its label does (TF Serving takes a label at its next config poll):
    wait_for_label says None while the server does not know the label, the version it names when
    that is another, and returns as soon as the label names the version asked for."""
    from mnist_client.client import Target, wait_for_label, wait_until_available
    from serving.model_server.model_config import single_model_config

    base = tmp_path / "models" / "mnist"
    shutil.copytree(saved_model_dir, base / "1")
    server, address = start_model_server(base)
    stable = Target(address, label="stable")
    try:
        assert wait_until_available(Target(address), [1], 60).get(1) == "AVAILABLE"
        assert wait_for_label(stable, 1, timeout=0.5) is None
        config = single_model_config("mnist", base.resolve())
        config.model_config_list.config[0].version_labels["stable"] = 1
        threading.Timer(1.0, server.manager.apply_config, [config]).start()
        started = time.monotonic()
        assert wait_for_label(stable, 1, timeout=30) == 1
        assert 0.9 < time.monotonic() - started < 10
        assert wait_for_label(stable, 2, timeout=0.5) == 1
    finally:
        server.stop(grace=0)



class Unavailable:
    """A PredictionService that counts its calls and answers each UNAVAILABLE after ``pause`` s."""

    def __init__(self, pause: float):
        from mnist_client.protos import prediction_service_pb2_grpc

        self.pause, self.calls = pause, 0
        servicer = type("Servicer", (prediction_service_pb2_grpc.PredictionServiceServicer,),
                        {"GetModelMetadata": self.answer, "Predict": self.answer})
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def answer(self, request, context):
        self.calls += 1
        time.sleep(self.pause)
        context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")


@pytest.mark.parametrize("pause", [0.0, 0.1])
def test_a_call_is_tried_at_most_five_times_within_its_one_deadline(pause: float) -> None:
    # One retry layer (the channel's policy), one deadline for all of a call's tries: a loop of our
    # own around the policy used to make 4 x 4 = 16 tries, each with a fresh deadline.
    from mnist_client import predict
    from mnist_client.client import MAX_ATTEMPTS, ServingError

    server = Unavailable(pause)
    try:
        started = time.monotonic()
        with pytest.raises(ServingError) as refused:
            predict(np.zeros((1, 28, 28, 1), np.float32), address=f"127.0.0.1:{server.port}", timeout=1.0)
        took = time.monotonic() - started
    finally:
        server.server.stop(0)
    assert 2 <= server.calls <= MAX_ATTEMPTS == 5, server.calls
    assert took < 1.0 + 0.5, f"a 1 s call took {took:.1f} s"
    assert "unavailable" in str(refused.value) or "within 1s" in str(refused.value), refused.value
