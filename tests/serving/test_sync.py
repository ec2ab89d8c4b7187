"""The S3 -> model directory sync against a real SeaweedFS: read-only access, atomicity, config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import botocore.exceptions
import pytest
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from serving.sync import local_versions, sync_once
from storage.embedded import start_weed
from storage.models import MANIFEST, ModelStore
from storage.settings import StoreSettings
from tests.conftest import REPO

LINEAGE = {"flow_run_id": "sync-test"}


def read_config(path: Path) -> model_server_config_pb2.ModelServerConfig:
    return text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())


def test_sync_mirrors_wanted_versions_and_writes_labels(store: ModelStore, saved_model_dir: Path,
                                                        tmp_path: Path) -> None:
    for _ in range(3):
        store.publish(saved_model_dir, LINEAGE)
    store.set_label("stable", 1)
    base = tmp_path / "models" / "mnist"
    result = sync_once(store, base)  # only labelled versions are served: an unlabelled request gets stable
    assert result.downloaded == [1] and local_versions(base) == [1]
    assert (base / "1" / MANIFEST).is_file() and (base / "1" / "saved_model.pb").is_file()
    config = read_config(tmp_path / "models" / "models.config").model_config_list.config[0]
    assert config.name == "mnist" and config.base_path == str(base.resolve())
    assert list(config.model_version_policy.specific.versions) == [1]
    # TF Serving labels only versions it has loaded: the label comes once an earlier config listed it
    assert dict(config.version_labels) == {} and result.labels_pending
    labelled = sync_once(store, base)
    assert labelled.downloaded == [] and labelled.labels == {"stable": 1} and not labelled.labels_pending
    assert dict(read_config(tmp_path / "models" / "models.config").model_config_list.config[0].version_labels) == \
        {"stable": 1}
    store.set_label("stable", 3)
    moving = sync_once(store, base)  # version 3 first, the label still on 1 until 3 is listed
    assert moving.downloaded == [3] and local_versions(base) == [1, 3] and moving.labels == {"stable": 1}
    again = sync_once(store, base)
    assert again.downloaded == [] and again.removed == [1] and local_versions(base) == [3]
    assert dict(read_config(tmp_path / "models" / "models.config").model_config_list.config[0].version_labels) == \
        {"stable": 3}


def test_a_label_on_a_version_the_listing_lacks_stays_where_the_server_has_it(store: ModelStore, saved_model_dir: Path,
                                                                              tmp_path: Path) -> None:
    """A label read naming a version the sync's listing does not hold as complete (published and
    labelled between the sync's two reads): the config keeps the label where the server has it for
    the round, never drops it (a config without stable fails every call that asks for stable)."""
    store.publish(saved_model_dir, LINEAGE)
    store.set_label("stable", 1)
    base = tmp_path / "models" / "mnist"
    sync_once(store, base)
    assert sync_once(store, base).labels == {"stable": 1}
    store.update_json(store.key("_registry", "labels.json"), lambda labels: {**(labels or {}), "stable": 2})
    kept = sync_once(store, base)  # version 2 has no manifest yet: not complete in this listing
    assert kept.labels == {"stable": 1} and local_versions(base) == [1]
    assert dict(read_config(tmp_path / "models" / "models.config").model_config_list.config[0].version_labels) == \
        {"stable": 1}


def test_a_config_write_that_fails_leaves_no_scratch_file_and_says_what_lags(store: ModelStore,
                                                                           saved_model_dir: Path,
                                                                           tmp_path: Path) -> None:
    from serving.sync import LocalWriteError

    store.publish(saved_model_dir, LINEAGE)
    store.set_label("stable", 1)
    base = tmp_path / "models" / "mnist"
    refused = tmp_path / "models" / "models.config"
    refused.mkdir(parents=True)  # the rename onto it fails, as a full disk's write does
    with pytest.raises(LocalWriteError, match="models.config") as failed:
        sync_once(store, base, refused)
    assert "stable" in failed.value.behind
    assert not [p.name for p in refused.parent.iterdir() if p.name.startswith(".models.config.")]


def test_sync_skips_a_version_that_does_not_verify(store: ModelStore, saved_model_dir: Path, tmp_path: Path) -> None:
    from storage.models import VerificationFailed

    store.publish(saved_model_dir, LINEAGE)
    store.set_label("stable", 1)
    store.client.put_object(Bucket=store.bucket, Key=store.key(1, "saved_model.pb"), Body=b"tampered")
    store.publish(saved_model_dir, LINEAGE)
    store.set_label("canary", 2)
    base = tmp_path / "mnist"
    result = sync_once(store, base)  # version 1 is refused, version 2 still syncs
    assert set(result.refused) == {1} and "saved_model.pb" in result.refused[1]
    assert local_versions(base) == [2] and not list(base.glob(".sync-*"))
    with pytest.raises(VerificationFailed, match="saved_model.pb"):
        store.verify(1)


def test_sync_works_with_read_only_credentials(saved_model_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    identities = {"identities": [
        {"name": "publisher", "credentials": [{"accessKey": "publisher", "secretKey": "publisher-secret"}],
         "actions": ["Admin", "Read", "List", "Write", "Tagging"]},
        {"name": "sidecar", "credentials": [{"accessKey": "sidecar", "secretKey": "sidecar-secret"}],
         "actions": ["Read", "List"]}]}
    s3_config = tmp_path / "s3.json"
    s3_config.write_text(json.dumps(identities))
    weed = start_weed(tmp_path / "weed", "publisher", "publisher-secret", s3_config=s3_config)
    try:
        monkeypatch.setenv("MNIST_S3_ENDPOINT", weed.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "publisher")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "publisher-secret")
        publisher = ModelStore(StoreSettings())
        publisher.publish(saved_model_dir, LINEAGE)
        publisher.set_label("stable", 1)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "sidecar")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sidecar-secret")
        reader = ModelStore(StoreSettings())
        result = sync_once(reader, tmp_path / "models" / "mnist")
        assert result.downloaded == [1] and result.labels_pending
        assert sync_once(reader, tmp_path / "models" / "mnist").labels == {"stable": 1}
        with pytest.raises(botocore.exceptions.ClientError) as refused:
            reader.client.put_object(Bucket=reader.bucket, Key="models/mnist/evil", Body=b"x")
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    finally:
        weed.stop()


def test_sync_killed_mid_download_never_exposes_a_partial_version(store: ModelStore, saved_model_dir: Path,
                                                                 store_env: dict[str, str], tmp_path: Path) -> None:
    store.publish(saved_model_dir, LINEAGE)
    base = tmp_path / "models" / "mnist"
    process = subprocess.Popen([sys.executable, "-m", "tests.slowed_store", "sync", str(base)], cwd=REPO,
                               stdout=subprocess.PIPE,
                               text=True, env={**os.environ, **store_env})
    seen = []
    while len([line for line in seen if "/1/" in line]) < 2:  # two files of version 1 downloaded
        seen.append(process.stdout.readline())
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stdout.close()
    assert local_versions(base) == [] and list(base.glob(".sync-*")), "partial data stays hidden in staging"
    result = sync_once(store, base)
    assert result.downloaded == [1] and not list(base.glob(".sync-*"))
    assert json.loads((base / "1" / MANIFEST).read_text())["version"] == 1


def test_sigterm_stops_the_embedded_store_a_command_started(tmp_path: Path) -> None:
    from storage.embedded import process_alive, read_state

    env = {**os.environ, "MNIST_STATE_DIR": str(tmp_path / "state"), "MNIST_S3_ENDPOINT": ""}
    sync = subprocess.Popen([sys.executable, "-m", "cli", "sync", "--model-base-path", str(tmp_path / "m"),
                             "--watch", "--interval", "1"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while read_state(tmp_path / "state") is None and time.monotonic() < deadline:
        time.sleep(0.2)
    store = read_state(tmp_path / "state")
    assert store is not None, "the sync did not start an embedded store"
    sync.send_signal(signal.SIGTERM)
    assert sync.wait(timeout=30) != 0
    assert not process_alive(store.pid) and read_state(tmp_path / "state") is None


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.1)


def test_sync_moves_a_label_only_once_the_server_has_the_version(store: ModelStore, saved_model_dir: Path,
                                                                tmp_path: Path) -> None:
    """Against `mnist serve` refusing labels on versions not AVAILABLE, as TF Serving does by default
    (server_core.cc UpdateModelVersionLabelMap): the sync lists the new version first, waits for
    GetModelStatus to report it AVAILABLE, then moves the label; no config is ever refused and
    `stable` answers throughout."""
    import numpy as np

    from mnist_client.client import Target, predict_probabilities
    from serving.model_server.manager import ModelManager
    from serving.model_server.model_config import read_model_config_file
    from serving.model_server.server import ModelServer, ServerOptions
    from storage.embedded import free_port

    base = tmp_path / "models" / "mnist"
    config_file = tmp_path / "models" / "models.config"
    store.publish(saved_model_dir, LINEAGE)
    store.set_label("stable", 1)
    sync_once(store, base)  # first pass, before the server runs: version 1, no label yet
    port = free_port()
    server = ModelServer(ModelManager(read_model_config_file(config_file)),
                         ServerOptions(port=port, poll_seconds=0.2, config_poll_seconds=0.2),
                         config_file).start()
    target = Target(f"127.0.0.1:{port}", "mnist")
    try:
        first = sync_once(store, base, server=target, load_timeout=60)
        assert first.labels == {"stable": 1}
        wait_until(lambda: server.manager.labels == {"mnist": {"stable": 1}})
        store.publish(saved_model_dir, LINEAGE)
        store.set_label("stable", 2)
        second = sync_once(store, base, server=target, load_timeout=60)
        assert second.downloaded == [2] and second.labels == {"stable": 2} and second.removed == [1]
        wait_until(lambda: server.manager.labels == {"mnist": {"stable": 2}})
        assert server.config_refusals == 0
        _, version = predict_probabilities(np.zeros((1, 28, 28, 1), np.float32),
                                           Target(target.address, label="stable"))
        assert version == 2
    finally:
        server.stop(grace=1)


def test_a_version_that_fails_to_load_is_reported_without_waiting_out_the_timeout(saved_model_dir: Path,
                                                                                   tmp_path: Path) -> None:
    """The wait the sync and the live check use: a version seen LOADING that then ends (TF Serving
    gives up after its retries) settles it at once; an END not seen to begin in this wait may be a
    past life of the version, so it is waited on to the timeout."""
    from mnist_client.client import Target, wait_until_available
    from serving.model_server.manager import LoadRetries
    from tests.tf_serving_cases import served_copy

    with served_copy(saved_model_dir, tmp_path, retries=LoadRetries(max_retries=1, interval_seconds=1.5)) as (
            _, address, base):
        broken = base / "2"
        broken.mkdir()
        (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
        started = time.monotonic()
        assert wait_until_available(Target(address), [2], timeout=120).get(2) == "END"
        assert time.monotonic() - started < 30  # not the 120 s timeout
        started = time.monotonic()
        assert wait_until_available(Target(address), [2], timeout=2).get(2) == "END"
        assert time.monotonic() - started >= 2  # already END when this wait began


def test_a_rollback_reaches_a_stock_client_that_names_no_label(store: ModelStore, saved_model_dir: Path,
                                                               tmp_path: Path) -> None:
    """tensorflow-serving-api's own stubs, a PredictRequest naming only the model: TF Serving answers
    it with the newest version it serves, so the sync serves only labelled versions, and a
    rollback of ``stable`` moves those clients back too."""
    import grpc
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from mnist_client.client import Target
    from serving.model_server.manager import ModelManager
    from serving.model_server.model_config import read_model_config_file
    from serving.model_server.server import ModelServer, ServerOptions
    from storage.embedded import free_port

    base, config_file = tmp_path / "models" / "mnist", tmp_path / "models" / "models.config"
    for version in (1, 2):
        store.publish(saved_model_dir, LINEAGE)
        store.set_label("stable", version)
    sync_once(store, base)
    port = free_port()
    server = ModelServer(ModelManager(read_model_config_file(config_file)),
                         ServerOptions(port=port, poll_seconds=0.2, config_poll_seconds=0.2), config_file).start()
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"  # no version, no label
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 28, 28, 1), np.float32)))

    def unlabelled_answer() -> int:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            return stub.Predict(request, timeout=10).model_spec.version.value

    try:
        sync_once(store, base, server=Target(f"127.0.0.1:{port}"), load_timeout=60)
        wait_until(lambda: server.manager.labels == {"mnist": {"stable": 2}})
        assert unlabelled_answer() == 2
        assert store.rollback("stable")[1] == 1
        sync_once(store, base, server=Target(f"127.0.0.1:{port}"), load_timeout=60)
        wait_until(lambda: server.manager.labels == {"mnist": {"stable": 1}})
        wait_until(lambda: unlabelled_answer() == 1)
        assert local_versions(base) == [1] and server.config_refusals == 0
    finally:
        server.stop(grace=1)


class OutputLines:
    """A started process's output, read line by line in a thread (a pipe read must never block the test)."""

    def __init__(self, process: subprocess.Popen):
        import threading

        self.process, self.lines = process, []
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def matching(self, text: str) -> list[str]:
        return [line for line in list(self.lines) if text in line]

    def __str__(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> None:
        """SIGTERM the process; wait for it and its output."""
        self.process.terminate()
        self.process.wait(timeout=30)
        self.thread.join(timeout=10)
        self.process.stdout.close()


def watching_sync(base: Path, store_env: dict[str, str], tmp_path: Path, interval: float) -> subprocess.Popen:
    """``mnist sync --watch`` in a process of its own, as the stack runs it."""
    return subprocess.Popen([sys.executable, "-m", "cli", "sync", "--model-base-path", str(base), "--watch",
                             "--interval", str(interval)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **store_env, "MNIST_STATE_DIR": str(tmp_path / "state")})


def assert_failures_said_in_one_line_each(output: OutputLines, count: int, what: str) -> None:
    """``count`` failed attempts said, one line each, with growing waits, and no traceback."""
    failures = output.matching("sync incomplete:")
    assert len(failures) >= count and all(what in line for line in failures), str(output)
    waits = [float(line.rsplit("retrying in ", 1)[1].split("s", 1)[0]) for line in failures]
    assert waits == sorted(waits) and waits[-1] > waits[0], waits  # a backoff, not a fixed beat
    assert "Traceback" not in str(output)


def test_a_watching_sync_retries_a_failing_local_write_until_it_passes(store: ModelStore, saved_model_dir: Path,
                                                                       store_env: dict[str, str],
                                                                       tmp_path: Path) -> None:
    """A local write that fails (a file where version 2's directory must go: the rename fails as a
    full or read-only disk's writes do) is a failed attempt: said in one line, its staging removed,
    retried with a growing wait, and the version appears by itself once the cause is gone. The
    one-shot sync ends on the same fault with one line and exit 1."""
    for version in (1, 2):
        store.publish(saved_model_dir, LINEAGE)
        store.set_label("stable", version)
    base = tmp_path / "models" / "mnist"
    base.mkdir(parents=True)
    blocker = base / "2"
    blocker.write_text("in the way")
    once = subprocess.run([sys.executable, "-m", "cli", "sync", "--model-base-path", str(base)], cwd=REPO,
                          capture_output=True, text=True,
                          env={**os.environ, **store_env, "MNIST_STATE_DIR": str(tmp_path / "state")})
    assert once.returncode == 1 and "Traceback" not in once.stderr, once.stderr
    assert once.stderr.strip().count("\n") == 0 and "writing version 2 into" in once.stderr, once.stderr
    process = watching_sync(base, store_env, tmp_path, interval=0.2)
    output = OutputLines(process)
    try:
        wait_until(lambda: len(output.matching("sync incomplete:")) >= 3 or process.poll() is not None, 60)
        assert process.poll() is None, str(output)
        assert_failures_said_in_one_line_each(output, 3, "writing version 2 into")
        assert not list(base.glob(".sync-*")), "a failed attempt leaves no staging behind"
        blocker.unlink()
        wait_until(lambda: local_versions(base) == [2], 30)
        wait_until(lambda: bool(output.matching("sync recovered after")), 10)
        assert process.poll() is None
    finally:
        output.stop()


def fill(directory: Path) -> Path:
    """A file that takes every free byte of ``directory``'s file system."""
    filler = directory / "filler"
    with filler.open("wb") as sink:
        try:
            while True:
                sink.write(b"\0" * 65536)
                sink.flush()
        except OSError:
            pass
    return filler


@pytest.fixture()
def small_disk(tmp_path: Path, saved_model_dir: Path):
    """A real tmpfs of room for about two and a half versions of the smoke model, unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    size = sum(f.stat().st_size for f in saved_model_dir.rglob("*") if f.is_file())
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 5 // 2 + (1 << 20)}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.faults
def test_a_full_disk_delays_a_version_until_space_is_freed(store: ModelStore, saved_model_dir: Path,
                                                           store_env: dict[str, str], small_disk: Path,
                                                           tmp_path: Path) -> None:
    """The model directory on a real, full tmpfs: the watching sync says each failed attempt in one
    line (what, where, how far the served labels lag the registry), keeps running, and syncs
    version 2 by itself once space is freed."""
    base = small_disk / "mnist"
    store.publish(saved_model_dir, LINEAGE)
    store.set_label("stable", 1)
    sync_once(store, base)
    sync_once(store, base)  # the label follows once its version is listed
    store.publish(saved_model_dir, LINEAGE)
    store.set_label("stable", 2)
    filler = fill(small_disk)
    once = subprocess.run([sys.executable, "-m", "cli", "sync", "--model-base-path", str(base)], cwd=REPO,
                          capture_output=True, text=True,
                          env={**os.environ, **store_env, "MNIST_STATE_DIR": str(tmp_path / "state")})
    assert once.returncode == 1 and "Traceback" not in once.stderr, once.stderr
    assert "no space left on device writing version 2" in once.stderr, once.stderr
    process = watching_sync(base, store_env, tmp_path, interval=0.5)
    output = OutputLines(process)
    try:
        wait_until(lambda: len(output.matching("sync incomplete:")) >= 4 or process.poll() is not None, 120)
        assert process.poll() is None, str(output)
        assert_failures_said_in_one_line_each(output, 4, "no space left on device writing version 2 into")
        assert all("the registry says stable=2, the server is told stable=1" in line
                   for line in output.matching("sync incomplete:")), str(output)
        assert local_versions(base) == [1] and not list(base.glob(".sync-*"))
        filler.unlink()
        wait_until(lambda: 2 in local_versions(base), 70)  # within the longest wait (60 s) and a round
        wait_until(lambda: local_versions(base) == [2] and bool(output.matching("sync recovered after")), 30)
        assert process.poll() is None
    finally:
        output.stop()
