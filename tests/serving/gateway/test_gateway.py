"""The logging gateway in front of the local server, over real loopback gRPC and HTTP, with a real
SeaweedFS: request ids, PredictionLog records TensorFlow reads, a store outage that fails no request,
a flush on SIGTERM, a kill's lost logs counted, metrics and readiness. Feedback: test_feedback.py."""

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

from mnist_client.client import ServingError, Target, predict_call
from mnist_client.protos import predict_pb2, prediction_service_pb2_grpc
from mnist_client.tensors import to_tensor_proto
from serving.model_server.model_config import single_model_config
from serving.protocol.http import HttpLimits
from storage.embedded import free_port, start_weed
from tests.conftest import REPO, metric_values, start_model_server
from tests.gateway_cases import (  # noqa: F401  fixtures, used by name
    APP_A,
    APP_B,
    LABELLER,
    bearer,
    digits,
    logged,
    start_gateway,
    stores,
    upstream,
    wait_for,
)


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

    from serving.gateway.log_records import Call, request_outline
    from serving.gateway.prediction_logger import PredictionLogger
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
    """Only the id a publish signs (``storage/live_check.py``) keeps a call out of drift and
    feedback; a caller's own ``live-check-`` id is served traffic."""
    from storage.live_check import FirstLiveChecks, live_check_key
    from storage.settings import TrafficSettings
    from tasks.drift import served_traffic

    _, address, _ = upstream
    key = live_check_key(TrafficSettings())  # as mnist gateway and the publisher find it: the store's secret
    assert key is not None
    gateway = start_gateway(address, live_check_key=key)
    target = Target(f"127.0.0.1:{gateway.port}")
    feedback_url = f"http://127.0.0.1:{gateway.rest.port}/v1/models/mnist/feedback"
    try:
        served = predict_call(digits[:3], target)
        posing = predict_call(digits[:5], target, request_id="live-check-v1")  # a caller's choice
        checked = predict_call(digits[:64], target, request_id=key.request_id(1))  # what a publish sends
        wait_for(lambda: gateway.logger.written_records == 3)
        feedback = [httpx.post(feedback_url, json={"request_id": call.request_id, "label": 1},
                               headers=bearer(LABELLER)) for call in (checked, posing)]
    finally:
        gateway.stop()
    assert [key.marks(entry) for entry, _ in logged(gateway.logs)] == [False, False, True]
    assert feedback[0].status_code == 404 and "live check" in feedback[0].json()["error"]
    assert feedback[1].status_code == 200
    summaries = served_traffic(logged(gateway.logs), FirstLiveChecks(key))  # what the drift flow reads of the window
    assert list(summaries) == [served.version] and int(summaries[served.version].arrays()["count"]) == 3 + 5


def test_the_rest_side_keeps_one_connection_upstream_per_thread_across_upstream_restarts(store_env) -> None:
    """A restart upstream closes the kept connection: the gateway opens another in its place, and
    lets the old one go (it used to keep every one it ever opened, to close them at its stop)."""
    import socket
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    accepted: list[socket.socket] = []

    class Models(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the model server's REST side

        def do_GET(self) -> None:  # noqa: N802  http.server's spelling
            accepted.append(self.connection)
            body = b'{"model_version_status": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args) -> None:
            pass

    port = free_port()
    gateway = start_gateway(f"127.0.0.1:{free_port()}", f"127.0.0.1:{port}", rest_limits=HttpLimits(threads=1))
    try:
        for _restart in range(6):
            upstream = ThreadingHTTPServer(("127.0.0.1", port), Models)
            serving = threading.Thread(target=upstream.serve_forever, daemon=True)
            serving.start()
            try:
                answer = httpx.get(f"http://127.0.0.1:{gateway.rest.port}/v1/models/mnist", timeout=10)
                assert answer.status_code == 200, answer.text
            finally:
                upstream.shutdown()
                upstream.server_close()
                for connection in accepted:  # what a stopped server's end of a connection does
                    connection.shutdown(socket.SHUT_RDWR)
                accepted.clear()
        assert len(gateway.rest_connections) == 1
    finally:
        gateway.stop(drain_seconds=1)
