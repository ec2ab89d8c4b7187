"""No prediction log lost to a store outage: the gateway's spool on local disk, against a real
SeaweedFS that is stopped and started again at the same address, a real model server upstream and
real Predict calls. A batch the store does not take is spooled (fsynced, renamed into place), the
drain writes it once the store is back, to the same keys a direct write uses, exactly once."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from mnist_client.client import ServingError, Target, predict_call
from storage.embedded import RunningWeed, free_port, start_weed
from tests.conftest import REPO, metric_values
from tests.conftest import wait_for as conftest_wait_for
from tests.gateway_cases import digits, logged, start_gateway, stores, upstream, wait_for  # noqa: F401

ACCESS, SECRET = "spool", "spool-secret-7d1e"


@pytest.fixture()
def stoppable_store(store_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A SeaweedFS of this test's own, which it may stop and start again on the same dir and ports."""
    holder: dict[str, RunningWeed] = {"weed": start_weed(tmp_path / "weed", ACCESS, SECRET)}
    for name, value in {"MNIST_S3_ENDPOINT": holder["weed"].endpoint, "AWS_ACCESS_KEY_ID": ACCESS,
                        "AWS_SECRET_ACCESS_KEY": SECRET}.items():
        monkeypatch.setenv(name, value)
    stores()  # the bucket, made while the store is up

    def restart() -> None:
        holder["weed"] = start_weed(tmp_path / "weed", ACCESS, SECRET, ports=holder["weed"].ports)

    yield holder, restart
    holder["weed"].stop()


class SteadyLoad:
    """Predicts of one digit through the gateway, every ``pause`` seconds, in a thread; the request
    ids of those answered (a call that fails, e.g. while the gateway restarts, is counted apart)."""

    def __init__(self, address: str, images: np.ndarray, pause: float = 0.02):
        self.target, self.images, self.pause = Target(address, timeout=5), images, pause
        self.answered: list[str] = []
        self.failed = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopping.wait(self.pause):
            try:
                self.answered.append(predict_call(self.images[len(self.answered) % 64:][:1], self.target).request_id)
            except ServingError:
                self.failed += 1

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)


def metrics(rest_port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{rest_port}/monitoring/prometheus/metrics").text


def assert_logged_exactly_once(answered: list[str]) -> None:
    ids = Counter(entry.request_id for entry, _ in logged(stores()[0]))
    missing = [request_id for request_id in answered if request_id not in ids]
    assert not missing, f"{len(missing)} of {len(answered)} answered calls have no log"
    assert max(ids.values()) == 1, [request_id for request_id, count in ids.items() if count > 1][:5]


def test_a_store_outage_spools_logs_and_loses_none(stoppable_store, upstream, digits: np.ndarray,
                                                   tmp_path: Path) -> None:
    """Four seconds without the store under steady load: every answered call's log is in the store
    afterwards, exactly once; meanwhile the spool depth shows on the metrics page."""
    holder, restart = stoppable_store
    _, address, _ = upstream
    gateway = start_gateway(address, retry_seconds=0.5, batch_records=16, spool=tmp_path / "spool")
    gateway.logger.spooled.max_drain_backoff = 1.0  # (5 s by default) the test waits for the drain, not its backoff
    load = SteadyLoad(f"127.0.0.1:{gateway.port}", digits)
    try:
        wait_for(lambda: gateway.logger.written_records > 0)
        holder["weed"].stop()
        wait_for(lambda: metric_values(metrics(gateway.rest.port), "mnist_gateway_log_spool_batches")
                 .get((), 0) > 0)
        time.sleep(2)
        restart()
        wait_for(lambda: gateway.logger.spool.depth == 0)
        load.stop()
        gateway.logger.flush_seconds = 0.05
        wait_for(lambda: gateway.logger.unwritten == 0 and gateway.logger.spool.depth == 0)
        page = metrics(gateway.rest.port)
    finally:
        load.stop()
        gateway.stop(drain_seconds=5)
    assert not load.failed and len(load.answered) > 50
    assert not metric_values(page, "mnist_gateway_logs_dropped_total"), page
    assert_logged_exactly_once(load.answered)


def test_the_drain_writes_what_a_previous_gateway_left_once_and_trusts_nothing_else(
        store_env, tmp_path: Path, digits: np.ndarray) -> None:
    """A spooled batch that was written just before a crash (its file not yet removed) is written
    again to the same keys: no duplicate. A symlink named as a batch is not followed or counted;
    a file named as a batch that does not read is dropped and counted, once."""
    from prometheus_client import CollectorRegistry

    from serving.gateway.prediction_logger import PredictionLogger
    from serving.gateway.spool import Spool
    from storage.logs import LogEntry, days_back, prepare_batch

    logs, _ = stores()
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime())
    entries = [LogEntry(f"{index:032x}", now, 1, "stable", "grpc", 1) for index in range(3)]
    batch = prepare_batch(entries, [[f"record {index}".encode()] for index in range(3)])
    root = tmp_path / "spool"
    spool = Spool(root, logs.uri(), 1 << 20)
    assert spool.put(batch) and spool.depth == 1
    logs.write_prepared(batch)  # the upload went through; then the gateway died
    outside = tmp_path / "outside.batch"
    outside.write_bytes(b"{}\n")
    (spool.directory / f"{batch.folder}_000000-000aaaaaaaaa.batch").symlink_to(outside)
    (spool.directory / f"{batch.folder}_000001-000bbbbbbbbb.batch").write_bytes(b"not a batch")
    (spool.directory / f".{batch.folder}_000002-000ccccccccc.batch.1-2.tmp").write_bytes(b"cut short")
    registry = CollectorRegistry()
    logger = PredictionLogger(logs, 1.0, registry, to_messages=None, flush_seconds=0.2,
                              spool=Spool(root, logs.uri(), 1 << 20))
    assert logger.spool is not None and logger.spool.depth == 2  # the batch and the unreadable file
    logger.start()
    try:
        wait_for(lambda: logger.spool.depth == 0)
    finally:
        logger.close(5.0)
    keys = logs.batch_keys(days_back(1))
    assert len(keys) == 1 and [entry.request_id for entry, _ in logs.read_batch(keys[0])] == \
        [entry.request_id for entry in entries]
    assert registry.get_sample_value("mnist_gateway_logs_dropped_total", {"reason": "spool_unreadable"}) == 1
    assert outside.read_bytes() == b"{}\n" and sorted(p.name for p in spool.directory.iterdir()) == \
        [f"{batch.folder}_000000-000aaaaaaaaa.batch"]  # the symlink alone, untouched; the scratch file gone


def test_a_batch_the_store_can_never_take_is_dropped_not_left_to_hold_the_others(
        store_env, tmp_path: Path) -> None:
    """A spooled batch whose name the store already holds with other records fails the same way
    for ever: it is dropped and counted, and the batches behind it are written; a file larger than
    any batch is dropped without being read into memory."""
    from prometheus_client import CollectorRegistry

    from serving.gateway.prediction_logger import PredictionLogger
    from serving.gateway.spool import MAX_HEADER, MAX_PAYLOAD, Spool
    from storage.logs import LogEntry, days_back, prepare_batch

    logs, _ = stores()
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime())
    batches = [prepare_batch([LogEntry(f"{index:032x}", now, 1, "", "grpc", 1)], [[f"record {index}".encode()]])
               for index in range(3)]
    root = tmp_path / "spool"
    spool = Spool(root, logs.uri(), 1 << 30)
    for batch in batches:
        assert spool.put(batch)
    first = sorted(spool.names())[0]
    taken = next(b for b in batches if first.endswith(f"_{b.name}.batch"))
    clash = prepare_batch([LogEntry(f"{99:032x}", now, 1, "", "grpc", 1)], [[b"other records"]])
    logs.write_prepared(dataclasses.replace(clash, folder=taken.folder, name=taken.name))
    huge = spool.directory / f"{taken.folder}_000000-000aaaaaaaaa.batch"
    with huge.open("wb") as sparse:  # sparse: no disk spent
        sparse.truncate(MAX_HEADER + MAX_PAYLOAD + 2)
    registry = CollectorRegistry()
    logger = PredictionLogger(logs, 1.0, registry, to_messages=None, flush_seconds=0.2,
                              spool=Spool(root, logs.uri(), 1 << 30))
    logger.start()
    try:
        wait_for(lambda: logger.spool is not None and logger.spool.depth == 0)
    finally:
        logger.close(5.0)
    written = {entry.request_id for key in logs.batch_keys(days_back(1)) for entry in logs.read_index(key)[1] if entry}
    others = {b.entries[0].request_id for b in batches if b is not taken}
    assert others <= written and taken.entries[0].request_id not in written
    assert registry.get_sample_value("mnist_gateway_logs_dropped_total", {"reason": "spool_conflict"}) == 1
    assert registry.get_sample_value("mnist_gateway_logs_dropped_total", {"reason": "spool_unreadable"}) == 1


def test_a_spool_whose_disk_is_full_sends_batches_to_a_store_that_is_back(store_env, tmp_path: Path) -> None:
    """The spool's disk full (a small tmpfs) while the drain still waits out its backoff: a batch
    goes to the store if it takes it, instead of being dropped."""
    from prometheus_client import CollectorRegistry

    from serving.gateway.prediction_logger import PredictionLogger
    from serving.gateway.spool import Spool
    from storage.logs import LogEntry, days_back, prepare_batch

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs is not permitted here")
    try:
        logs, _ = stores()
        spool = Spool(disk / "spool", logs.uri(), 1 << 30)
        with (disk / "filler").open("wb") as filler:  # the disk full
            try:
                filler.write(b"x" * (128 << 10))
            except OSError:
                pass
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime())
        batch = prepare_batch([LogEntry(f"{7:032x}", now, 1, "", "grpc", 1)], [[os.urandom(20_000)]])
        registry = CollectorRegistry()
        logger = PredictionLogger(logs, 1.0, registry, to_messages=None, flush_seconds=0.2, spool=spool)
        logger.spooled.put(batch)
        written = {entry.request_id for key in logs.batch_keys(days_back(1)) for entry in logs.read_index(key)[1]
                   if entry}
        assert batch.entries[0].request_id in written
        assert registry.get_sample_value("mnist_gateway_logs_dropped_total", {"reason": "spool_error"}) in (None, 0)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_spool_drops_and_counts_only_past_its_bound(store_env, tmp_path: Path) -> None:
    from serving.gateway.spool import Spool
    from storage.logs import LogEntry, prepare_batch

    logs, _ = stores()
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime())
    batches = [prepare_batch([LogEntry(f"{index:032x}", now, 1, "", "grpc", 1)], [[os.urandom(4000)]])
               for index in range(3)]
    spool = Spool(tmp_path / "spool", logs.uri(), 9000)
    assert [spool.put(batch) for batch in batches] == [True, True, False]
    assert spool.depth == 2 and spool.used_bytes <= 9000


def gateway_process(address: str, port: int, rest_port: int, spool: Path, log_path: Path) -> subprocess.Popen:
    with log_path.open("a") as log:
        return subprocess.Popen([sys.executable, "-m", "cli", "gateway", "--upstream", address, "--port", str(port),
                                 "--rest-api-port", str(rest_port), "--log-flush-seconds", "1",
                                 "--log-spool", str(spool)], cwd=REPO, env={**os.environ, "MNIST_RETRY_SECONDS": "2"},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_listening(process: subprocess.Popen, log_path: Path, starts: int) -> None:
    deadline = time.monotonic() + 60
    while log_path.read_text().count("listening on") < starts:
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.1)


@pytest.mark.faults
def test_a_minute_long_store_outage_and_a_gateway_restart_in_it_lose_no_log(stoppable_store, upstream,
                                                                            digits: np.ndarray,
                                                                            tmp_path: Path) -> None:
    """`mnist gateway` under steady Predicts while its store is down for 60 s, and stopped (SIGTERM)
    and started again halfway through: what it held at the stop goes to the spool, the new process
    writes what the old one left, and afterwards every answered call's log is in the store, once."""
    holder, restart = stoppable_store
    _, address, _ = upstream
    port, rest_port, spool = free_port(), free_port(), tmp_path / "spool"
    log_path = tmp_path / "gateway.log"
    process = gateway_process(address, port, rest_port, spool, log_path)
    load = None
    try:
        wait_listening(process, log_path, 1)
        load = SteadyLoad(f"127.0.0.1:{port}", digits, pause=0.05)
        wait_for(lambda: metric_values(metrics(rest_port), "mnist_gateway_logs_written_total").get((), 0) > 0)
        holder["weed"].stop()
        started = time.monotonic()
        time.sleep(30)
        assert metric_values(metrics(rest_port), "mnist_gateway_log_spool_batches")[()] > 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log_path.read_text()
        process = gateway_process(address, port, rest_port, spool, log_path)
        wait_listening(process, log_path, 2)
        time.sleep(max(0.0, 60 - (time.monotonic() - started)))
        restart()  # the drain tries again within its longest wait, 30 s
        conftest_wait_for(lambda: metric_values(metrics(rest_port), "mnist_gateway_log_spool_batches")[()] == 0, 90)
        load.stop()
        time.sleep(3)  # the last flush (every second), written directly now that the store is back
        page = metrics(rest_port)
    finally:
        if load:
            load.stop()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    output = log_path.read_text()
    assert "Traceback" not in output, output
    assert output.count("log store unavailable: spooling prediction logs") >= 1, output
    assert "spooled" in output and "log store back after" in output, output
    assert not metric_values(page, "mnist_gateway_logs_dropped_total"), page
    assert len(load.answered) > 600, (len(load.answered), load.failed)
    assert_logged_exactly_once(load.answered)
