"""The gRPC server and client over real loopback gRPC: round trip, status codes, switching, TLS."""

from __future__ import annotations

import datetime
import json
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from mnist_client.client import ServingError, Target, model_status, predict, predict_probabilities, signature_io
from serving.model_server.model_config import single_model_config
from serving.model_server.tensors import to_tensor_proto
from storage.embedded import free_port
from tasks.export import saved_model_predict
from tests.conftest import run_mnist, start_model_server


@pytest.fixture()
def server(model_base: Path):
    server, address = start_model_server(model_base)
    yield address
    server.stop(grace=1)


def test_predict_round_trip_matches_the_saved_model(server: str, saved_model_dir: Path, test_images) -> None:
    images, labels = test_images
    results = predict(images[:32], address=server)
    offline = saved_model_predict(saved_model_dir, images[:32])
    assert [r["digit"] for r in results] == offline.argmax(axis=1).tolist()
    assert all(r["version"] == 1 and len(r["top3"]) == 3 for r in results)
    assert abs(results[0]["confidence"] - float(offline[0].max())) < 1e-5
    assert np.mean([r["digit"] for r in results] == labels[:32]) > 0.85


def test_metadata_names_the_tensors_and_status_reports_available(server: str) -> None:
    target = Target(server)
    with grpc.insecure_channel(server) as channel:
        assert signature_io(channel, target) == ("image", "probabilities", 1)
    assert model_status(target) == [(1, "AVAILABLE")]


def raw_predict(address: str, inputs: dict[str, object], name: str = "mnist", version: int | None = None,
                label: str | None = None) -> grpc.RpcError | None:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    if label:
        request.model_spec.version_label = label
    for key, proto in inputs.items():
        request.inputs[key].CopyFrom(proto)
    with grpc.insecure_channel(address) as channel:
        try:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
        except grpc.RpcError as error:
            return error
    return None


def bad_dtype() -> object:
    proto = to_tensor_proto(np.zeros((1, 28, 28, 1)))
    proto.dtype = 2  # DT_DOUBLE
    return proto


def short_content() -> object:
    proto = to_tensor_proto(np.zeros((2, 28, 28, 1)))
    proto.tensor_content = proto.tensor_content[:100]
    return proto


GOOD = to_tensor_proto(np.zeros((1, 28, 28, 1), np.float32))
# Codes and messages as TF Serving answers them (server_core.cc, predict_util.cc): see test_tf_serving_conformance.py
BAD_REQUESTS = [
    ("unknown model", {"image": GOOD}, {"name": "fashion"}, grpc.StatusCode.NOT_FOUND, "Latest(fashion)"),
    ("unknown version", {"image": GOOD}, {"version": 9}, grpc.StatusCode.NOT_FOUND, "Specific(mnist, 9)"),
    ("unknown label", {"image": GOOD}, {"label": "canary"}, grpc.StatusCode.INVALID_ARGUMENT,
     "Unrecognized servable version label: canary"),
    ("missing input", {}, {}, grpc.StatusCode.INVALID_ARGUMENT, "Missing but required: {image}"),
    ("wrong input key", {"pixels": GOOD}, {}, grpc.StatusCode.INVALID_ARGUMENT,
     "input tensor alias not found in signature: pixels"),
    ("wrong dtype", {"image": bad_dtype()}, {}, grpc.StatusCode.INVALID_ARGUMENT, "DT_DOUBLE"),
    ("wrong shape", {"image": to_tensor_proto(np.zeros((1, 28, 28), np.float32))}, {}, grpc.StatusCode.INVALID_ARGUMENT,
     "shape [1, 28, 28]"),
    ("truncated content", {"image": short_content()}, {}, grpc.StatusCode.INVALID_ARGUMENT, "tensor_content"),
]


def test_each_bad_request_gets_its_status_and_the_server_stays_up(server: str, test_images) -> None:
    for name, inputs, spec, code, text in BAD_REQUESTS:
        error = raw_predict(server, inputs, **spec)
        assert error is not None, name
        assert error.code() == code, (name, error.code(), error.details())
        assert text in error.details(), (name, error.details())
    assert raw_predict(server, {"image": to_tensor_proto(test_images[0][:1024])}) is None


def test_version_switch_under_steady_load_fails_no_request(model_base: Path, saved_model_dir: Path,
                                                         test_images) -> None:
    server, address = start_model_server(model_base)
    seen: dict[int, int] = {}
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        target = Target(address, timeout=10)
        with grpc.insecure_channel(address) as channel:
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    _, version = predict_probabilities(test_images[0][:8], target, channel)
                    seen[version] = seen.get(version, 0) + 1
                except ServingError as error:
                    failures.append(str(error))

    clients = [threading.Thread(target=load) for _ in range(3)]
    try:
        for client in clients:
            client.start()
        time.sleep(1.0)
        staging = model_base / ".incoming"
        shutil.copytree(saved_model_dir, staging)
        staging.rename(model_base / "2")  # the sync's atomic rename
        deadline = time.monotonic() + 60
        while seen.get(2, 0) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(model_base / "1")
        time.sleep(1.0)
    finally:
        stop.set()
        for client in clients:
            client.join()
        server.stop(grace=1)
    assert failures == []
    assert seen.get(1, 0) > 10 and seen.get(2, 0) >= 20
    assert sorted(server.manager.models["mnist"].versions) == [2]


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 and an SSLConfig file in TF Serving's format."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(cert_pem)
    config = tmp_path / "ssl.config"
    config.write_text(f"server_key: {key_pem!r}\nserver_cert: {cert_pem!r}\n".replace("'", '"'))
    return config, ca_file


def test_tls_on_and_off(model_base: Path, tmp_path: Path, test_images) -> None:
    ssl_config, ca_file = self_signed(tmp_path)
    server, address = start_model_server(model_base, ssl_config_file=ssl_config)
    try:
        secure = predict(test_images[0][:4], address=address, tls=True, ca_cert=ca_file)
        assert len(secure) == 4 and secure[0]["version"] == 1
        with pytest.raises(ServingError, match="unavailable"):
            predict(test_images[0][:1], address=address, timeout=3)  # plaintext to a TLS port
    finally:
        server.stop(grace=1)
    plain, plain_address = start_model_server(model_base)
    try:
        assert len(predict(test_images[0][:4], address=plain_address)) == 4
    finally:
        plain.stop(grace=1)


def test_cli_against_a_stopped_server_exits_non_zero(mnist_dir: Path) -> None:
    result = run_mnist("predict", "--server", f"127.0.0.1:{free_port()}", "--mnist-test", "0:3", "--timeout", "2",
                       env={"MNIST_DATA_DIR": str(mnist_dir)})
    assert result.returncode == 1
    assert "mnist predict: server at 127.0.0.1:" in result.stderr and "unavailable" in result.stderr
    assert "Traceback" not in result.stderr


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` grey pixels, with one row of data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
            + chunk(b"IEND", b""))


def test_an_image_bomb_is_refused_before_decoding_wherever_images_are_read(tmp_path: Path) -> None:
    """The client's reader is the one mnist data add uses too (tasks/ingest.py)."""
    from tasks.ingest import read_source

    folder = tmp_path / "scans" / "3"
    folder.mkdir(parents=True)
    (folder / "bomb.png").write_bytes(png_header(12000, 12000))  # 144 Mpx: Pillow alone would decode it
    found = read_source(tmp_path / "scans")
    assert found.images == [] and len(found.errors) == 1
    assert "bomb.png: 144,000,000 pixels, more than the limit of 24,000,000" in found.errors[0]
    (folder / "bomb.png").write_bytes(png_header(6000, 5000))  # 30 Mpx: under Pillow's limit, over ours
    assert "bomb.png: 6000x5000 pixels, more than the limit" in read_source(tmp_path / "scans").errors[0]


def test_cli_bad_files_get_one_clear_line(server: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    cases = {str(tmp_path / "missing.png"): "no such file", str(empty): "empty file",
             str(text): "not a readable image"}
    from PIL import Image

    truncated = tmp_path / "cut.png"
    Image.new("L", (64, 64), 255).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    cases[str(truncated)] = "not a readable image"
    bomb = tmp_path / "bomb.png"  # 20000x20000 declared: 400 Mpx, refused from its header, never decoded
    bomb.write_bytes(png_header(20000, 20000))
    cases[str(bomb)] = "bomb.png: 400,000,000 pixels, more than the limit of 24,000,000"
    for path, expected in cases.items():
        result = run_mnist("predict", "--server", server, path)
        assert result.returncode == 1 and expected in result.stderr, (path, result.stderr[-500:])
        assert "Traceback" not in result.stderr
    unknown = run_mnist("predict", "--server", server, "--model-name", "fashion", str(truncated.with_name("x.npy")))
    assert unknown.returncode == 1


def test_cli_reads_photos_and_arrays_as_mnist_digits(server: str, tmp_path: Path, test_images) -> None:
    from PIL import Image

    images, labels = test_images
    paths = []
    for index in range(5):  # dark ink on white paper, large, RGB, off-centre
        paper = np.full((300, 240), 255, dtype=np.uint8)
        digit = Image.fromarray((255 - images[index, :, :, 0] * 255).astype(np.uint8)).resize((150, 150))
        paper[100:250, 20:170] = np.asarray(digit)
        path = tmp_path / f"digit{index}.jpg"
        Image.fromarray(paper).convert("RGB").save(path, quality=95)
        paths.append(str(path))
    np.save(tmp_path / "batch.npy", (images[5:8, :, :, 0] * 255).astype(np.uint8))
    result = run_mnist("predict", "--server", server, "--json", *paths, str(tmp_path / "batch.npy"))
    assert result.returncode == 0, result.stderr[-1000:]
    answers = json.loads(result.stdout)
    assert [a["input"] for a in answers][-3:] == [f"{tmp_path / 'batch.npy'}[{i}]" for i in range(3)]
    assert all({"input", "digit", "confidence", "top3"} <= set(a) for a in answers)
    correct = sum(a["digit"] == int(label) for a, label in zip(answers, labels[:8]))
    assert correct >= 6, answers


def test_prepared_digit_fits_20x20_and_is_centred_by_mass() -> None:
    from mnist_client.images import prepare_digit

    canvas = np.ones((120, 80), dtype=np.float32)
    canvas[10:70, 5:25] = 0.0  # a dark bar on white, far from the centre
    digit = prepare_digit(canvas)[:, :, 0]
    rows, cols = np.nonzero(digit > 0.05)
    assert rows.max() - rows.min() + 1 <= 20 and cols.max() - cols.min() + 1 <= 20
    centre = np.array([(np.indices(digit.shape)[axis] * digit).sum() / digit.sum() for axis in (0, 1)])
    assert np.all(np.abs(centre - 14) <= 1.0)


def test_version_policies_pick_the_right_versions() -> None:
    from tensorflow_serving.config import model_server_config_pb2

    from serving.model_server.model_config import versions_to_serve

    config = model_server_config_pb2.ModelConfig()
    assert versions_to_serve(config, [1, 2, 3]) == {3}  # no policy: latest 1, as TF Serving
    config.model_version_policy.latest.num_versions = 2
    assert versions_to_serve(config, [1, 2, 3]) == {2, 3}
    config.model_version_policy.all.SetInParent()
    assert versions_to_serve(config, [1, 2, 3]) == {1, 2, 3}
    config.model_version_policy.specific.versions.extend([1, 7])
    assert versions_to_serve(config, [1, 2, 3]) == {1}


def reload(address: str, config) -> None:
    from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc

    request = model_management_pb2.ReloadConfigRequest()
    request.config.CopyFrom(config)
    with grpc.insecure_channel(address) as channel:
        model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(request, timeout=60)


def test_reload_config_serves_labels(model_base: Path, saved_model_dir: Path, test_images) -> None:
    shutil.copytree(saved_model_dir, model_base / "2")
    server, address = start_model_server(model_base)
    try:
        assert sorted(server.manager.models["mnist"].versions) == [2]
        config = single_model_config("mnist", model_base.resolve())
        model = config.model_config_list.config[0]
        model.model_version_policy.specific.versions.extend([1, 2])
        reload(address, config)  # first load both: TF Serving labels only AVAILABLE versions
        model.version_labels["stable"] = 1
        model.version_labels["canary"] = 2
        reload(address, config)
        assert predict(test_images[0][:2], address=address, label="stable")[0]["version"] == 1
        assert predict(test_images[0][:2], address=address, label="canary")[0]["version"] == 2
        assert model_status(Target(address, label="stable")) == [(2, "AVAILABLE"), (1, "AVAILABLE")]
        # mnist predict asks for stable unless told otherwise, and says which version answered
        default = run_mnist("predict", "--server", address, "--mnist-test", "0:1")
        newest = run_mnist("predict", "--server", address, "--mnist-test", "0:1", "--latest")
        assert default.returncode == 0 and "[v1]" in default.stdout and default.stderr == "", default.stderr
        assert newest.returncode == 0 and "[v2]" in newest.stdout
    finally:
        server.stop(grace=1)


def test_predict_says_so_when_the_server_has_no_stable_label(server: str) -> None:
    result = run_mnist("predict", "--server", server, "--mnist-test", "0:1")
    assert result.returncode == 0 and "[v1]" in result.stdout, result.stderr
    assert result.stderr.strip().endswith("has no 'stable' label for mnist; asking for the newest version it serves")


def test_show_model_prints_the_served_version_and_its_lineage(store, store_env, saved_model_dir: Path,
                                                              tmp_path: Path) -> None:
    from serving.sync import sync_once
    from tasks.publish import publish_model

    metrics = {"test_accuracy": 0.9911, "test_loss": 0.03, "per_class_accuracy": [0.99] * 10}
    publish_model(store, saved_model_dir, metrics, {"flow_run_id": "run-abc", "data_fingerprint": "f" * 64},
                  "stable")
    base = tmp_path / "served" / "mnist"
    sync_once(store, base)
    server, address = start_model_server(base)
    try:
        result = run_mnist("predict", "--server", address, "--show-model", env=store_env)
    finally:
        server.stop(grace=1)
    assert result.returncode == 0, result.stderr[-1000:]
    for expected in ("serving version 1", "stable", "run-abc", "0.9911", "f" * 64):
        assert expected in result.stdout, (expected, result.stdout)


def test_rest_api_answers_like_tf_serving(model_base: Path, saved_model_dir: Path, test_images) -> None:
    import httpx

    rest_port = free_port()
    server, _ = start_model_server(model_base, rest_api_port=rest_port)
    base = f"http://127.0.0.1:{rest_port}/v1/models/mnist"
    images = test_images[0][:4]
    try:
        status = httpx.get(base, timeout=10).json()
        assert status["model_version_status"][0]["version"] == "1"
        assert status["model_version_status"][0]["state"] == "AVAILABLE"
        metadata = httpx.get(f"{base}/metadata", timeout=10).json()
        assert "serving_default" in json.dumps(metadata)
        rows = httpx.post(f"{base}:predict", json={"instances": images.tolist()}, timeout=30).json()
        offline = saved_model_predict(saved_model_dir, images)
        assert np.allclose(rows["predictions"], offline, atol=1e-5)
        columns = httpx.post(f"{base}/versions/1:predict", json={"inputs": {"image": images.tolist()}}, timeout=30)
        assert columns.status_code == 200 and np.allclose(columns.json()["outputs"], offline, atol=1e-5)
        wrong_shape = httpx.post(f"{base}:predict", json={"instances": [[1.0, 2.0]]}, timeout=10)
        assert wrong_shape.status_code == 400 and "shape" in wrong_shape.json()["error"]
        assert httpx.post(f"{base}:predict", content=b"{not json", timeout=10).status_code == 400
        assert httpx.get("http://127.0.0.1:%d/v1/models/fashion" % rest_port, timeout=10).status_code == 404
        unknown_label = httpx.post(f"{base}/labels/canary:predict", json={"instances": images.tolist()}, timeout=10)
        assert unknown_label.status_code == 400 and "canary" in unknown_label.json()["error"]
    finally:
        server.stop(grace=1)


def test_config_file_is_read_once_unless_a_poll_period_is_given(model_base: Path) -> None:
    """TF Serving re-reads --model_config_file only every --model_config_file_poll_wait_seconds;
    without it (0, its default), a later label in the file never takes effect."""
    from serving.model_server.manager import ModelManager
    from serving.model_server.model_config import read_model_config_file
    from serving.model_server.server import ModelServer, ServerOptions
    from serving.sync import model_config_text

    config_file = model_base.parent / "models.config"
    for period, expected in ((0.0, {}), (0.2, {"canary": 1})):
        config_file.write_text(model_config_text("mnist", str(model_base), [1], {}))
        server = ModelServer(ModelManager(read_model_config_file(config_file), True),
                             ServerOptions(port=free_port(), poll_seconds=0.2, config_poll_seconds=period),
                             config_file).start()
        try:
            time.sleep(0.1)
            config_file.write_text(model_config_text("mnist", str(model_base), [1], {"canary": 1}))
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and server.manager.labels.get("mnist", {}) != expected:
                time.sleep(0.1)
            time.sleep(1.0)  # long past five file-system polls: a read-once file stays as it was
            assert server.manager.labels.get("mnist", {}) == expected, period
        finally:
            server.stop(grace=1)


def test_a_gzip_bomb_and_too_many_images_are_refused_before_the_work(model_base: Path) -> None:
    """The REST bomb that cost 3.2 GB (0.19 MB gzipped, 47.6 MB of JSON, 10,000 images) gets 413
    at the inflate limit; a request declaring more images than allowed is refused from its shape,
    over gRPC (INVALID_ARGUMENT) and REST (400), in one line naming the limit."""
    import gzip

    import grpc
    import httpx

    from mnist_client.protos import predict_pb2, prediction_service_pb2_grpc
    from mnist_client.tensors import to_tensor_proto

    rest_port = free_port()
    server, address = start_model_server(model_base, rest_api_port=rest_port)
    url = f"http://127.0.0.1:{rest_port}/v1/models/mnist:predict"
    try:
        row = "[" + ",".join(["[0.5]"] * 28) + "]"
        image = "[" + ",".join([row] * 28) + "]"
        bomb = gzip.compress(('{"instances": [' + ",".join([image] * 10_000) + "]}").encode(), 9)
        assert len(bomb) < 400_000
        exploded = httpx.post(url, content=bomb, headers={"Content-Encoding": "gzip"}, timeout=60)
        small = "[" + ",".join(["[" + ",".join(["[0]"] * 28) + "]"] * 28) + "]"  # 3 KB a digit: 4200 fit in 16 MiB
        many = ('{"instances": [' + ",".join([small] * 4200) + "]}").encode()
        refused_rest = httpx.post(url, content=many, timeout=60)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "mnist"
        request.inputs["image"].CopyFrom(to_tensor_proto(np.zeros((5000, 28, 28, 1), np.float32)))
        with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            with pytest.raises(grpc.RpcError) as refused_grpc:
                prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
        fine = httpx.post(url, json={"instances": [[[[0.5]] * 28] * 28] * 2}, timeout=30)
    finally:
        server.stop(grace=1)
    assert exploded.status_code == 413 and "larger than 16777216 bytes decompressed" in exploded.json()["error"]
    assert refused_rest.status_code == 400 and "4200 rows, more than the 4096 images" in refused_rest.json()["error"]
    assert refused_grpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "5000 rows, more than the 4096 images" in refused_grpc.value.details()
    assert fine.status_code == 200 and len(fine.json()["predictions"]) == 2
