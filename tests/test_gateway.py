"""The logging gateway in front of the local server, over real loopback gRPC and HTTP, with a real
SeaweedFS: request ids, PredictionLog records TensorFlow reads, a store outage that fails no request,
a flush on SIGTERM, feedback, metrics and readiness."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mnist_client._generated.tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from mnist_client.client import ServingError, Target, predict, predict_call
from mnist_client.tensors import to_tensor_proto
from serving.gateway.callers import Caller, Credential
from serving.gateway.server import Gateway, GatewayOptions
from serving.model_server.model_config import single_model_config
from storage.embedded import free_port, start_weed
from storage.logs import FeedbackStore, PredictionLogStore, TrafficSettings
from tasks.data import load_test_set
from tests.conftest import REPO, metric_values, run_mnist, start_model_server, stopped_by_sigterm
from tests.conftest import wait_for as conftest_wait_for


@pytest.fixture(scope="module")
def digits(prepared_path: Path) -> np.ndarray:
    return load_test_set(prepared_path)[0][:64]


@pytest.fixture()
def upstream(saved_model_dir: Path, tmp_path: Path):
    """The local server (gRPC and REST, metrics on) with version 1 labelled ``stable``."""
    base = tmp_path / "models" / "mnist"
    shutil.copytree(saved_model_dir, base / "1")
    rest_port = free_port()
    server, address = start_model_server(base, rest_api_port=rest_port,
                                         metrics_path="/monitoring/prometheus/metrics")
    config = single_model_config("mnist", base.resolve())
    config.model_config_list.config[0].version_labels["stable"] = 1
    server.manager.apply_config(config)
    yield server, address, f"127.0.0.1:{rest_port}"
    server.stop(grace=1)


def stores(retry_seconds: float = 20.0) -> tuple[PredictionLogStore, FeedbackStore]:
    settings = TrafficSettings().model_copy(update={"retry_seconds": retry_seconds})
    logs = PredictionLogStore(settings)
    logs.ensure_bucket()
    return logs, FeedbackStore(settings)


# who may send feedback in these tests: a trusted labeller and two untrusted apps
LABELLER = Credential(b"labeller-token-9f3c1e77a2b4d8e6", Caller("labeller", trusted=True))
APP_A = Credential(b"app-a-token-55e1c2d3b4a59687", Caller("app-a", trusted=False))
APP_B = Credential(b"app-b-token-0a1b2c3d4e5f6a7b", Caller("app-b", trusted=False))


def bearer(credential: Credential) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential.token.decode()}"}


def start_gateway(upstream_address: str, upstream_rest: str | None = None, **options) -> Gateway:
    logs, feedback = stores(options.pop("retry_seconds", 20.0))
    settings = GatewayOptions(upstream=upstream_address, upstream_rest=upstream_rest, rest_port=free_port(),
                              **{"flush_seconds": 0.2, "credentials": (LABELLER, APP_A, APP_B), **options})
    return Gateway(settings, logs, feedback).start()


def wait_for(condition) -> None:
    conftest_wait_for(condition, timeout=30.0, interval=0.05)


def logged(logs: PredictionLogStore) -> list:
    return [item for key in logs.batch_keys([time.strftime("%Y-%m-%d", time.gmtime())])
            for item in logs.read_batch(key)]


def test_sampled_predictions_are_prediction_logs_tensorflow_reads_with_ids_versions_and_labels(
        store_env, upstream, digits: np.ndarray, tmp_path: Path) -> None:
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    _, address, rest = upstream
    # one log object of all four: batch objects written in the same second list in no set order
    gateway = start_gateway(address, rest, batch_records=4, flush_seconds=30.0)
    try:
        grpc_answers = [predict_call(digits[i:i + 2], Target(f"127.0.0.1:{gateway.port}", label="stable"),
                                     request_id=f"caller-{i}" if i == 0 else None) for i in range(0, 6, 2)]
        # the relay offers a call to the log just after its answer is sent: the REST call, asserted
        # below as the fourth record, must not be offered before the third gRPC call is
        wait_for(lambda: metric_values(gateway.metrics.page().decode(), "mnist_gateway_logs_sampled_total") == {(): 3})
        rest_reply = httpx.post(f"http://127.0.0.1:{gateway.rest.port}/v1/models/mnist/labels/stable:predict",
                                json={"instances": digits[6:7].tolist()}, timeout=30)
        direct = predict_call(digits[:1], Target(address))
        wait_for(lambda: gateway.logger.written_records == 4)
    finally:
        gateway.stop()
    assert rest_reply.status_code == 200 and len(rest_reply.json()["predictions"]) == 1
    ids = [answer.request_id for answer in grpc_answers] + [rest_reply.headers["x-request-id"]]
    assert "caller-0" not in ids and len(set(ids)) == 4 and direct.request_id is None  # the server gives none
    records = logged(gateway.logs)
    assert [entry.request_id for entry, _ in records] == ids
    assert [entry.client_request_id for entry, _ in records] == ["caller-0", "", "", ""]  # kept beside, not the key
    assert {(entry.version, entry.label, entry.api) for entry, _ in records[:3]} == {(1, "stable", "grpc")}
    assert (records[3][0].version, records[3][0].label, records[3][0].api) == (1, "stable", "rest")
    # TensorFlow itself reads the stored object as TFRecords of TF Serving's PredictionLog
    key = gateway.logs.batch_keys([records[0][0].time[:10]])[0].removesuffix(".json") + ".tfrecord.gz"
    path = tmp_path / "log.tfrecord.gz"
    path.write_bytes(gateway.logs.get_bytes(key))
    stored = tf.data.TFRecordDataset(str(path), compression_type="GZIP")
    first = prediction_log_pb2.PredictionLog.FromString(next(iter(stored)).numpy())
    assert first.log_metadata.model_spec.version_label == "stable"
    assert first.predict_log.response.model_spec.version.value == 1
    assert first.log_metadata.sampling_config.sampling_rate == 1.0
    sent = tf.make_ndarray(first.predict_log.request.inputs["image"])
    answered = tf.make_ndarray(first.predict_log.response.outputs["probabilities"])
    assert np.array_equal(sent, digits[0:2]) and np.allclose(answered, grpc_answers[0].probabilities)
    rest_log = prediction_log_pb2.PredictionLog.FromString(records[3][1])
    assert np.allclose(tf.make_ndarray(rest_log.predict_log.request.inputs["image"]), digits[6:7])


def test_only_the_sampled_fraction_is_logged(store_env, upstream, digits: np.ndarray) -> None:
    _, address, _ = upstream
    gateway = start_gateway(address, sample_rate=0.25)
    try:
        target = Target(f"127.0.0.1:{gateway.port}")
        for _ in range(200):
            predict_call(digits[:1], target)
        wait_for(lambda: gateway.logger.queue.empty())
        time.sleep(0.5)
        written = gateway.logger.written_records
    finally:
        gateway.stop()
    assert 25 <= written <= 80  # binomial(200, 0.25): mean 50, 5 sigma is about +-30
    assert len(logged(gateway.logs)) == written


def test_a_store_that_stops_mid_load_drops_logs_and_fails_no_request(store_env, upstream, digits: np.ndarray,
                                                                      tmp_path: Path, monkeypatch) -> None:
    _, address, _ = upstream
    weed = start_weed(tmp_path / "outage-store", "outage", "outage-secret-1")
    for name, value in {"MNIST_S3_ENDPOINT": weed.endpoint, "AWS_ACCESS_KEY_ID": "outage",
                        "AWS_SECRET_ACCESS_KEY": "outage-secret-1"}.items():
        monkeypatch.setenv(name, value)
    gateway = start_gateway(address, retry_seconds=1.0, batch_records=16, queue_size=64)
    failures: list[Exception] = []
    answered = []

    def load() -> None:
        target = Target(f"127.0.0.1:{gateway.port}", timeout=10)
        for _ in range(120):
            try:
                answered.append(predict_call(digits[:1], target))
            except ServingError as error:
                failures.append(error)

    try:
        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_for(lambda: gateway.logger.written_records > 0)
        weed.stop()  # the store goes away while requests keep coming
        for thread in threads:
            thread.join(timeout=120)
        page = httpx.get(f"http://127.0.0.1:{gateway.rest.port}/monitoring/prometheus/metrics").text
    finally:
        gateway.stop(drain_seconds=2)
    dropped = {sample.labels["reason"]: sample.value for family in text_string_to_metric_families(page)
               if family.name == "mnist_gateway_logs_dropped" for sample in family.samples}
    assert not failures and len(answered) == 480
    assert dropped.get("store_error", 0) + dropped.get("queue_full", 0) > 0
    assert gateway.logger.written_records + sum(dropped.values()) <= 480


def test_the_log_queue_holds_no_more_bytes_than_its_budget(store_env, digits: np.ndarray) -> None:
    """A store that cannot keep up must not grow the gateway past its memory limit: calls of 256
    digits (about 0.8 MB each) beyond a 2 MiB budget are dropped and counted, though the queue
    has room for 10,000 calls; those queued are written once the writer runs, logged from the
    request's outline (its spec and shapes), with every image counted."""
    from prometheus_client import CollectorRegistry

    from serving.gateway.prediction_logger import Call, PredictionLogger, request_outline
    from storage.logs import days_back

    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.version_label = "mnist", "stable"
    request.inputs["image"].CopyFrom(to_tensor_proto(np.repeat(digits, 4, axis=0)))
    response = predict_pb2.PredictResponse()
    response.model_spec.name, response.model_spec.version.value = "mnist", 1
    response.outputs["probabilities"].CopyFrom(to_tensor_proto(np.full((256, 10), 0.1, np.float32)))
    request_bytes, response_bytes = request.SerializeToString(), response.SerializeToString()
    logs, _ = stores()
    registry = CollectorRegistry()
    logger = PredictionLogger(logs, 1.0, registry, to_messages=None, flush_seconds=0.2, queue_bytes=2 << 20)
    calls = [Call(f"{index:032x}", "grpc", request_outline(request), request_bytes, response_bytes, 1)
             for index in range(5)]
    for call in calls:  # the writer is not running yet: as a store that does not answer
        logger.offer(call)
    queued = registry.get_sample_value("mnist_gateway_log_queue_bytes")
    dropped = registry.get_sample_value("mnist_gateway_logs_dropped_total", {"reason": "queue_full"})
    assert (queued, dropped) == (2 * calls[0].size, 3)
    assert 2 * calls[0].size <= 2 << 20 < 3 * calls[0].size
    logger.start()
    try:
        wait_for(lambda: logger.written_records == 2)
    finally:
        logger.close(5.0)
    assert registry.get_sample_value("mnist_gateway_log_queue_bytes") == 0
    entries = [entry for key in logs.batch_keys(days_back(1)) for entry in logs.read_index(key)[1]]
    assert [(e.request_id, e.examples, e.version, e.label) for e in entries] == \
        [(calls[i].request_id, 256, 1, "stable") for i in range(2)]


def test_sigterm_flushes_the_queued_logs_within_the_deadline(store_env, upstream, digits: np.ndarray,
                                                              tmp_path: Path) -> None:
    _, address, _ = upstream
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "gateway", "--upstream", address, "--port", str(port),
         "--log-flush-seconds", "600", "--drain-seconds", "20"],
        cwd=REPO, env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        first = process.stdout.readline()
        assert "listening on" in first, first
        ids = [predict_call(digits[:1], Target(f"127.0.0.1:{port}")).request_id for _ in range(20)]
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0 and time.monotonic() - started < 20, output
    assert "20 records written" in output
    assert [entry.request_id for entry, _ in logged(stores()[0])] == ids


def test_metrics_parse_and_count_per_version_on_the_gateway_and_the_server(store_env, saved_model_dir: Path,
                                                                            tmp_path: Path, digits) -> None:
    base = tmp_path / "models" / "mnist"
    for version in (1, 2):
        shutil.copytree(saved_model_dir, base / str(version))
    rest_port = free_port()
    server, address = start_model_server(base, rest_api_port=rest_port, metrics_path="/monitoring/prometheus/metrics")
    config = single_model_config("mnist", base.resolve())
    config.model_config_list.config[0].model_version_policy.all.SetInParent()
    server.manager.apply_config(config)
    gateway = start_gateway(address)
    try:
        for version, count in ((1, 3), (2, 2)):
            for _ in range(count):
                predict_call(digits[:1], Target(f"127.0.0.1:{gateway.port}", version=version))
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.version.value = "mnist", 7
        request.inputs["image"].CopyFrom(to_tensor_proto(digits[:1]))
        with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as channel, pytest.raises(grpc.RpcError) as missing:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        pages = [httpx.get(f"http://127.0.0.1:{port}/monitoring/prometheus/metrics").text
                 for port in (gateway.rest.port, rest_port)]
    finally:
        gateway.stop()
        server.stop(grace=1)
    for page in pages:
        per_version = metric_values(page, "mnist_serving_requests_total")
        counts = {dict(labels)["version"]: value for labels, value in per_version.items()
                  if dict(labels)["code"] == "OK"}
        assert counts == {"1": 3.0, "2": 2.0}
        assert metric_values(page, ":tensorflow:serving:request_count") == {
            (("model_name", "mnist"), ("status", "OK")): 5.0, (("model_name", "mnist"), ("status", "NOT_FOUND")): 1.0}
        latency = metric_values(page, ":tensorflow:serving:request_latency_count")
        assert latency == {(("API", "Predict"), ("entrypoint", "GRPC"), ("model_name", "mnist")): 5.0}


def test_readiness_flips_when_the_version_and_then_the_label_arrive(store_env, saved_model_dir: Path,
                                                                    tmp_path: Path) -> None:
    base = tmp_path / "models" / "mnist"
    base.mkdir(parents=True)
    rest_port = free_port()
    server, address = start_model_server(base, rest_api_port=rest_port)
    gateway = start_gateway(address)
    urls = [f"http://127.0.0.1:{port}/v1/models/mnist" for port in (rest_port, gateway.rest.port)]
    try:
        for url in urls:
            assert httpx.get(f"{url}/ready").status_code == 503
        shutil.copytree(saved_model_dir, base / "1")
        for url in urls:
            wait_for(lambda url=url: httpx.get(f"{url}/ready").status_code == 200)
            assert httpx.get(f"{url}/ready").json() == {"ready": True, "version": 1}
            assert "stable" in httpx.get(f"{url}/labels/stable/ready").json()["reason"]
        config = single_model_config("mnist", base.resolve())
        config.model_config_list.config[0].version_labels["stable"] = 1
        server.manager.apply_config(config)
        for url in urls:
            assert httpx.get(f"{url}/labels/stable/ready").json() == {"ready": True, "version": 1}
    finally:
        gateway.stop()
        server.stop(grace=1)


def test_feedback_round_trip_to_an_ingested_batch(store_env, upstream, digits: np.ndarray, tmp_path: Path,
                                                  mnist_dir: Path) -> None:
    _, address, _ = upstream
    shifted = np.roll(digits[:12], 2, axis=2)  # MNIST's own digits would be refused as duplicates
    gateway = start_gateway(address, sample_rate=1.0)
    unsampled = start_gateway(address, sample_rate=0.0)
    feedback_url = f"http://127.0.0.1:{gateway.rest.port}/v1/models/mnist/feedback"
    try:
        answers = predict(shifted[:10], address=f"127.0.0.1:{gateway.port}")  # one request of ten images
        singles = [predict_call(shifted[i:i + 1], Target(f"127.0.0.1:{gateway.port}")).request_id
                   for i in (10, 11)]
        skipped = predict_call(shifted[:1], Target(f"127.0.0.1:{unsampled.port}")).request_id
        wait_for(lambda: gateway.logger.written_records == 3)
        request_id = answers[0]["request_id"]
        replies = [httpx.post(feedback_url, json={"request_id": request_id, "index": i, "label": label},
                              headers=bearer(LABELLER)) for i, label in enumerate([7, 2, 1, 0, 4])]
        unknown = httpx.post(feedback_url, json={"request_id": "no-such-request", "label": 3}, headers=bearer(LABELLER))
        bad_label = httpx.post(feedback_url, json={"request_id": request_id, "label": 12}, headers=bearer(LABELLER))
        out_of_range = httpx.post(feedback_url, json={"request_id": request_id, "index": 10, "label": 1},
                                  headers=bearer(LABELLER))
        not_sampled = httpx.post(f"http://127.0.0.1:{unsampled.rest.port}/v1/models/mnist/feedback",
                                 json={"request_id": skipped, "label": 3}, headers=bearer(LABELLER))
    finally:
        gateway.stop()
        unsampled.stop()
    assert [reply.status_code for reply in replies] == [200] * 5
    assert replies[0].json()["version"] == 1 and answers[3]["index"] == 3
    assert replies[0].json()["caller"] == "labeller" and replies[0].json()["trusted"] is True
    assert unknown.status_code == 404 and "no-such-request" in unknown.json()["error"]
    assert bad_label.status_code == 400 and "0-9" in bad_label.json()["error"]
    assert out_of_range.status_code == 400 and "has 10 image(s)" in out_of_range.json()["error"]
    assert not_sampled.status_code == 404 and "not sampled" in not_sampled.json()["error"]
    # the CLI: one id, and a CSV with one good and one unknown id (refused in one line, exit 1)
    env = {"MNIST_DATA_DIR": str(mnist_dir)}
    assert run_mnist("feedback", singles[0], "9", env=env).returncode == 0
    csv_file = tmp_path / "feedback.csv"
    csv_file.write_text(f"request_id,label\n{singles[1]},5\nnobody,4\n")
    refused = run_mnist("feedback", "--csv", str(csv_file), env=env)
    assert refused.returncode == 1 and "1 of 2 refused" in refused.stderr and "nobody" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    added = run_mnist("data", "add", "--from-feedback", "--json", env=env)
    assert added.returncode == 0, added.stderr
    result = json.loads(added.stdout)
    assert result["batch"]["count"] == 7 and result["batch"]["source"] == "feedback"
    assert result["batch"]["label_histogram"][7] == 1 and result["batch"]["label_histogram"][9] == 1
    again = run_mnist("data", "add", "--from-feedback", env=env)
    assert again.returncode == 0 and "no new feedback" in again.stdout


def test_feedback_needs_a_known_token_and_is_attributed_and_rate_limited(store_env, upstream,
                                                                       digits: np.ndarray) -> None:
    _, address, _ = upstream
    gateway = start_gateway(address, feedback_per_minute=3)
    closed = start_gateway(address, credentials=())
    url = f"http://127.0.0.1:{gateway.rest.port}/v1/models/mnist/feedback"
    try:
        request_id = predict_call(digits[:1], Target(f"127.0.0.1:{gateway.port}")).request_id
        wait_for(lambda: gateway.logger.written_records == 1)
        body = {"request_id": request_id, "label": 3}
        refused = [httpx.post(url, json=body, headers=headers) for headers in (
            {}, {"Authorization": "Bearer not-a-token-of-anyone-at-all"}, {"Authorization": "Basic " + "x" * 30},
            {"Authorization": f"Token {APP_A.token.decode()}"})]
        taken = [httpx.post(url, json=body, headers=bearer(APP_A)) for _ in range(3)]
        limited = httpx.post(url, json=body, headers=bearer(APP_A))
        other_caller = httpx.post(url, json=body, headers=bearer(APP_B))  # the limit is per caller
        off = httpx.post(f"http://127.0.0.1:{closed.rest.port}/v1/models/mnist/feedback", json=body,
                         headers=bearer(LABELLER))
    finally:
        gateway.stop()
        closed.stop()
    assert [reply.status_code for reply in refused] == [401] * 4
    assert all(reply.headers["www-authenticate"].startswith("Bearer") for reply in refused)
    assert [reply.status_code for reply in taken] == [200] * 3 and limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1 and other_caller.status_code == 200
    assert off.status_code == 401 and "--feedback-tokens" in off.json()["error"]
    stored = gateway.feedback.all()
    assert sorted((item["caller"], item["trusted"]) for item in stored) == [("app-a", False), ("app-b", False)]


def test_a_callers_request_id_never_addresses_someone_elses_call(store_env, upstream, digits: np.ndarray) -> None:
    """Two callers send the same x-request-id: each call gets its own id from the gateway, the
    callers' id is kept beside both, and feedback on the shared id finds no call."""
    _, address, _ = upstream
    gateway = start_gateway(address)
    target = Target(f"127.0.0.1:{gateway.port}")
    try:
        first = predict_call(digits[:1], target, request_id="order-1796423773")
        second = predict_call(digits[1:2], target, request_id="order-1796423773")
        wait_for(lambda: gateway.logger.written_records == 2)
        collision = httpx.post(f"http://127.0.0.1:{gateway.rest.port}/v1/models/mnist/feedback",
                               json={"request_id": "order-1796423773", "label": 1}, headers=bearer(LABELLER))
    finally:
        gateway.stop()
    assert len({first.request_id, second.request_id, "order-1796423773"}) == 3
    entries = [entry for entry, _ in logged(gateway.logs)]
    assert [(e.request_id, e.client_request_id) for e in entries] == [
        (first.request_id, "order-1796423773"), (second.request_id, "order-1796423773")]
    assert collision.status_code == 404 and gateway.feedback.all() == []


def test_the_servers_rest_headers_and_health_reach_the_caller(store_env, saved_model_dir: Path, tmp_path: Path,
                                                              digits: np.ndarray, upstream) -> None:
    """With --rest_api_enable_cors_support, TF Serving's CORS headers (and its answer to a
    preflight) must survive the gateway, or a browser calling through it is refused; with
    --enable_grpc_healthcheck_service, a gRPC probe of the gateway answers as the server."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    base = tmp_path / "with-cors" / "mnist"  # beside the upstream fixture's model directory
    shutil.copytree(saved_model_dir, base / "1")
    rest_port = free_port()
    server, address = start_model_server(base, rest_api_port=rest_port, cors=True, health_check=True)
    gateway = start_gateway(address, f"127.0.0.1:{rest_port}")
    without_health = start_gateway(upstream[1], upstream[2])
    try:
        check = health_pb2.HealthCheckRequest(service="PredictionService")
        answer = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{gateway.port}")).Check(check, timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as off:  # the server has it off, as TF Serving by default
            channel = grpc.insecure_channel(f"127.0.0.1:{without_health.port}")
            health_pb2_grpc.HealthStub(channel).Check(check, timeout=10)
        assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED
        root = f"http://127.0.0.1:{gateway.rest.port}/v1/models/mnist"
        status = httpx.get(root, timeout=30)
        predicted = httpx.post(f"{root}:predict", json={"instances": digits[:1].tolist()}, timeout=30)
        preflight = httpx.options(f"{root}:predict", headers={"Origin": "https://app.example"}, timeout=30)
        for reply in (status, predicted, preflight):
            assert reply.status_code == 200, reply.text
            assert reply.headers["access-control-allow-origin"] == "*"
            assert reply.headers["access-control-allow-methods"] == "POST, GET"
        assert predicted.headers["x-request-id"] and len(predicted.headers.get_list("content-type")) == 1
        # a gzip body, which TF Serving takes, reaches the server decoded (and its Content-Encoding not forwarded)
        zipped = httpx.post(f"{root}:predict", content=gzip.compress(predicted.request.content),
                            headers={"Content-Encoding": "gzip"}, timeout=30)
        assert zipped.status_code == 200 and zipped.json() == predicted.json(), zipped.text
    finally:
        without_health.stop()
        gateway.stop()
        server.stop(grace=1)


def test_untrusted_labels_wait_in_quarantine_until_callers_agree_or_an_operator_accepts(
        store_env, upstream, digits: np.ndarray, mnist_dir: Path) -> None:
    from storage.datasets import DatasetSettings, DatasetStore
    from tasks.ingest import to_uint8

    _, address, _ = upstream
    shifted = np.roll(digits[:5], 2, axis=2)  # not MNIST's own digits, which ingest refuses as duplicates
    gateway = start_gateway(address)
    url = f"http://127.0.0.1:{gateway.rest.port}/v1/models/mnist/feedback"
    try:
        ids = [predict_call(shifted[i:i + 1], Target(f"127.0.0.1:{gateway.port}")).request_id for i in range(5)]
        wait_for(lambda: gateway.logger.written_records == 5)
        votes = [(0, APP_A, 0),                   # one untrusted caller: waits
                 (1, APP_A, 5), (1, APP_B, 5),    # two untrusted callers agree: trains, never tests
                 (2, APP_A, 0), (2, APP_B, 3),    # they disagree: waits
                 (3, APP_A, 0), (3, LABELLER, 7),  # a trusted caller decides; the other label is overruled
                 (4, APP_A, 2)]                   # waits until the operator accepts it below
        replies = [httpx.post(url, json={"request_id": ids[i], "label": label}, headers=bearer(who))
                   for i, who, label in votes]
    finally:
        gateway.stop()
    assert [reply.status_code for reply in replies] == [200] * len(votes)
    env = {"MNIST_DATA_DIR": str(mnist_dir)}
    review = run_mnist("feedback", "review", "--json", env=env)
    assert review.returncode == 0, review.stderr
    waiting = json.loads(review.stdout)
    assert {item["request_id"] for item in waiting["waiting"]} == {ids[0], ids[2], ids[4]}
    assert (waiting["trusted"], waiting["agreed"], waiting["quarantined"]) == (1, 1, 3)
    tie = run_mnist("feedback", "accept", ids[2], env=env)
    assert tie.returncode == 2 and "callers disagree" in tie.stderr
    assert run_mnist("feedback", "accept", ids[4], env=env).returncode == 0  # takes app-a's 2, as the operator's

    added = run_mnist("data", "add", "--from-feedback", "--json", env=env)
    assert added.returncode == 0, added.stderr
    batch = json.loads(added.stdout)["batch"]
    assert batch["count"] == 3 and batch["feedback"]["trusted"] == 2 and batch["feedback"]["agreed"] == 1
    histogram = np.bincount([5, 7, 2], minlength=10).tolist()
    assert batch["label_histogram"] == histogram  # no attacker's 0 among them
    stored = DatasetStore(DatasetSettings()).read_batch(batch["sha256"])
    agreed = next(i for i, image in enumerate(stored.images) if np.array_equal(image, to_uint8(shifted[1])))
    assert stored.splits[agreed] == 0 and stored.labels[agreed] == 5  # agreed by untrusted callers: train only
    after = json.loads(run_mnist("feedback", "review", "--json", env=env).stdout)
    assert {item["request_id"] for item in after["waiting"]} == {ids[0], ids[2]}
    shown = run_mnist("data", "show", str(json.loads(added.stdout)["version"]["version"]), env=env)
    assert shown.returncode == 0 and '"quarantined": 2' in shown.stdout


def test_no_untrusted_caller_makes_up_more_than_its_share_of_a_batch() -> None:
    from tasks.feedback import FeedbackPolicy, decide

    def vote(request: int, caller: str, label: int = 1) -> dict:
        return {"request_id": f"r{request}", "index": 0, "label": label, "caller": caller, "trusted": False,
                "time": f"2026-12-06T00:00:{request:02d}"}

    items = [vote(i, caller) for i in range(8) for caller in ("app-a", "app-b")]  # one pair agrees on all 8
    items += [vote(8 + i, caller) for i in range(4) for caller in ("app-c", "app-d")]
    decision = decide(items, FeedbackPolicy(quorum=2, max_caller_share=0.25))
    taken = [item["request_id"] for item in decision.accepted]
    assert taken == ["r0", "r1", "r2", "r8", "r9", "r10"] and len(decision.capped) == 6  # 3 each: 12 x 0.25
    assert decide(items, FeedbackPolicy(quorum=3)).accepted == []  # no image has three callers


def test_a_killed_gateway_is_followed_by_one_that_reports_what_the_kill_lost(store_env, upstream, digits: np.ndarray,
                                                                             tmp_path: Path) -> None:
    """The queue is in memory, so SIGKILL loses it; the ledger file lets the next start count it."""
    _, address, _ = upstream
    ledger = tmp_path / "ledger.json"

    def gateway_process(port: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "cli", "gateway", "--upstream", address, "--port", str(port),
                                 "--rest-api-port", str(free_port()), "--log-flush-seconds", "600",
                                 "--log-ledger", str(ledger)], cwd=REPO, env={**os.environ},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    port = free_port()
    killed = gateway_process(port)
    assert "listening on" in killed.stdout.readline()
    for _ in range(12):
        predict_call(digits[:1], Target(f"127.0.0.1:{port}"))
    wait_for(lambda: json.loads(ledger.read_text())["unwritten"] == 12)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    killed.stdout.close()
    restarted = gateway_process(port)
    try:
        lines = [restarted.stdout.readline() for _ in range(2)]  # the loss, then the listening line
        assert "listening on" in lines[1], lines
        restarted.send_signal(signal.SIGTERM)
        output = "".join(lines) + restarted.communicate(timeout=30)[0]
    finally:
        if restarted.poll() is None:
            os.killpg(restarted.pid, signal.SIGKILL)
            restarted.wait(timeout=30)
    assert "12 sampled calls were lost" in output and f"pid {killed.pid}" in output, output
    assert json.loads(ledger.read_text())["clean"] is True  # a clean stop leaves nothing to report


def test_live_check_traffic_stays_out_of_drift_and_feedback(store_env, upstream, digits: np.ndarray,
                                                            tmp_path: Path) -> None:
    from storage.logs import LIVE_CHECK_PREFIX
    from tasks.drift import served_traffic

    _, address, _ = upstream
    gateway = start_gateway(address)
    target = Target(f"127.0.0.1:{gateway.port}")
    try:
        served = predict_call(digits[:3], target)
        checked = predict_call(digits[:64], target, request_id=f"{LIVE_CHECK_PREFIX}v1")  # what a publish sends
        wait_for(lambda: gateway.logger.written_records == 2)
        feedback = httpx.post(f"http://127.0.0.1:{gateway.rest.port}/v1/models/mnist/feedback",
                              json={"request_id": checked.request_id, "label": 1}, headers=bearer(LABELLER))
    finally:
        gateway.stop()
    assert [entry.is_live_check for entry, _ in logged(gateway.logs)] == [False, True]
    assert feedback.status_code == 404 and "live check" in feedback.json()["error"]
    images, answers = served_traffic(logged(gateway.logs))  # what the drift flow reads of the window
    assert list(images) == [served.version] and sum(len(batch) for batch in images[served.version]) == 3


def test_hostile_feedback_bodies_get_400_in_one_line_and_no_traceback(store_env, upstream, digits: np.ndarray,
                                                                      tmp_path: Path) -> None:
    _, address, _ = upstream
    tokens = tmp_path / "tokens"
    tokens.write_text(f"labeller {LABELLER.token.decode()} trusted\n")
    port, rest_port = free_port(), free_port()
    gateway = subprocess.Popen([sys.executable, "-m", "cli", "gateway", "--upstream", address, "--port", str(port),
                                "--rest-api-port", str(rest_port), "--feedback-tokens", str(tokens)], cwd=REPO,
                               env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        assert "listening on" in gateway.stdout.readline()
        request_id = predict_call(digits[:1], Target(f"127.0.0.1:{port}")).request_id
        url = f"http://127.0.0.1:{rest_port}/v1/models/mnist/feedback"
        bodies = {"deeply nested": b"[" * 2000 + b"]" * 2000,
                  "a 4,000-digit label": f'{{"request_id": "{request_id}", "label": {"7" * 4000}}}'.encode(),
                  "a superscript digit": json.dumps({"request_id": request_id, "label": "\u00b2"}).encode(),
                  "a 4,000-digit request id": f'{{"request_id": {"1" * 4000}, "label": 1}}'.encode(),
                  "a float index": json.dumps({"request_id": request_id, "label": 1, "index": 0.5}).encode(),
                  "not JSON": b"\xff\xfe{",
                  "a list": b"[1, 2]"}
        replies = {name: httpx.post(url, content=body, headers={**bearer(LABELLER), "content-type": "application/json"})
                   for name, body in bodies.items()}
        too_big = httpx.post(url, content=f'{{"request_id": "{request_id}", "label": {"7" * 5000}}}'.encode(),
                             headers=bearer(LABELLER))  # the 5,000-digit label: refused before it is read
    finally:
        output = stopped_by_sigterm(gateway, timeout=30)
    for name, reply in replies.items():
        assert reply.status_code == 400, (name, reply.status_code, reply.text[:200])
        assert len(reply.json()["error"]) < 300 and "\n" not in reply.json()["error"], name
    assert too_big.status_code == 413
    assert "Traceback" not in output and "Error" not in output.replace("Errno", ""), output[-3000:]
