"""The S3 model store against a real SeaweedFS: protocol, labels, history, gc and faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from storage.embedded import start_weed
from storage.models import (
    MANIFEST,
    ModelStore,
    StoreAccessDenied,
    StoreError,
    VerificationFailed,
    VersionNotFound,
)
from storage.settings import StoreSettings
from tests.conftest import REPO, S3_SECRET_KEY, run_mnist

LINEAGE = {"flow_run_id": "run-1", "data_fingerprint": "abc"}
METRICS = {"metrics": {"test_accuracy": 0.99}}


def publish(store: ModelStore, directory: Path, **extra: object) -> int:
    return store.publish(directory, {**METRICS, **LINEAGE, **extra})["version"]


def test_publish_writes_tf_serving_layout_with_a_manifest_last(store: ModelStore, saved_model_dir: Path) -> None:
    assert store.complete_versions() == []
    assert publish(store, saved_model_dir) == 1 and publish(store, saved_model_dir) == 2
    keys = [item["Key"] for item in store.list_keys(store.key(""))]
    assert store.key(1, "saved_model.pb") in keys and store.key(1, MANIFEST) in keys
    assert any(key.startswith(store.key(1, "variables/")) for key in keys)
    manifest = store.verify(2)
    assert manifest["version"] == 2 and manifest["uri"].endswith("/mnist/2")
    assert manifest["files"]["saved_model.pb"]["size"] == (saved_model_dir / "saved_model.pb").stat().st_size
    assert manifest["flow_run_id"] == "run-1" and manifest["metrics"]["test_accuracy"] == 0.99
    assert store.complete_versions() == [1, 2]


def test_upload_order_puts_variables_first_and_the_graph_last(saved_model_dir: Path) -> None:
    from storage.models import scan_saved_model

    order = [f.relative for f in scan_saved_model(saved_model_dir)]
    assert order[0].startswith("variables/") and order[-1] == "saved_model.pb"


def test_numbers_are_never_reused_after_gc(store: ModelStore, saved_model_dir: Path) -> None:
    for _ in range(3):
        publish(store, saved_model_dir)
    store.set_label("stable", 1)
    assert store.gc(keep=1) == {"removed_versions": [2], "removed_leftovers": [], "aborted_uploads": []}
    assert store.complete_versions() == [1, 3]
    assert publish(store, saved_model_dir) == 4


def test_gc_never_removes_labelled_or_newest(store: ModelStore, saved_model_dir: Path) -> None:
    for _ in range(4):
        publish(store, saved_model_dir)
    store.set_label("stable", 2)
    store.set_label("canary", 1)
    store.gc(keep=1)
    assert store.complete_versions() == [1, 2, 4]
    with pytest.raises(StoreError, match="at least 1"):
        store.gc(keep=0)


def test_gc_aborts_the_multipart_uploads_a_killed_publish_left(store: ModelStore, store_env) -> None:
    """An upload begun and left (a publish killed mid-file) is aborted by `registry gc` once older
    than the grace period; one of another model's is not this gc's to touch."""
    store.ensure_bucket()
    other = ModelStore(StoreSettings(model_name="mnist-other"))
    left = {}
    for owner in (store, other):
        key = owner.key(7, "variables", "variables.data-00000-of-00001")
        upload = owner.client.create_multipart_upload(Bucket=owner.bucket, Key=key)["UploadId"]
        owner.client.upload_part(Bucket=owner.bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 1024)
        left[owner.settings.model_name] = key
    assert store.gc(keep=1)["aborted_uploads"] == []  # younger than MNIST_GC_GRACE_SECONDS: maybe still running
    gc = run_mnist("registry", "gc", "--keep", "1", "--grace-seconds", "0", env=store_env)
    assert gc.returncode == 0, gc.stderr
    assert gc.stdout.strip() == f"removed versions none, leftovers none, aborted unfinished uploads {left['mnist']}"
    assert [u["Key"] for u in store.unfinished_uploads(store.key(""))] == []
    assert [u["Key"] for u in other.unfinished_uploads(other.key(""))] == [left["mnist-other"]]
    assert store.history()[-1]["aborted_uploads"] == [left["mnist"]]


def test_changed_object_fails_verify_naming_the_file(store: ModelStore, saved_model_dir: Path,
                                                     store_env: dict[str, str]) -> None:
    version = publish(store, saved_model_dir)
    variables = next(k["Key"] for k in store.list_keys(store.key(version, "variables/")) if k["Key"].endswith("index"))
    store.client.put_object(Bucket=store.bucket, Key=variables, Body=b"tampered")
    with pytest.raises(VerificationFailed, match="variables/variables.index does not match"):
        store.verify(version)
    result = run_mnist("registry", "verify", str(version), env=store_env)
    assert result.returncode == 1 and "variables/variables.index" in result.stderr
    assert "Traceback" not in result.stderr
    as_json = run_mnist("registry", "verify", str(version), "--json", env=store_env)
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["verified"] is False


def test_wrong_credentials_fail_fast_and_write_nothing(store: ModelStore, saved_model_dir: Path,
                                                      store_env: dict[str, str]) -> None:
    publish(store, saved_model_dir)
    before = sorted(item["Key"] for item in store.list_keys(store.key("")))
    os.environ["AWS_SECRET_ACCESS_KEY"] = "wrong-secret"
    intruder = ModelStore(StoreSettings())
    started = time.monotonic()
    with pytest.raises(StoreAccessDenied) as denied:
        publish(intruder, saved_model_dir)
    assert time.monotonic() - started < 5  # not retried
    assert store_env["MNIST_S3_ENDPOINT"] in str(denied.value) and store.bucket in str(denied.value)
    assert "wrong-secret" not in str(denied.value)
    assert sorted(item["Key"] for item in store.list_keys(store.key(""))) == before
    result = run_mnist("registry", "list", env={**store_env, "AWS_SECRET_ACCESS_KEY": "wrong-secret"})
    assert result.returncode == 1 and "access denied" in result.stderr and "Traceback" not in result.stderr


def test_two_publishes_at_once_get_distinct_complete_versions(store_env, saved_model_dir: Path) -> None:
    results: list[object] = []

    def run() -> None:
        try:
            results.append(publish(ModelStore(StoreSettings()), saved_model_dir))
        except StoreError as error:  # one clean failure is acceptable; a mix is not
            results.append(error)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store = ModelStore(StoreSettings())
    versions = [r for r in results if isinstance(r, int)]
    assert len(versions) == len(set(versions)) >= 2
    assert store.complete_versions() == sorted(versions)
    for version in versions:
        assert store.verify(version)["version"] == version


def test_racing_label_moves_and_publishes_lose_no_label_and_no_event(store: ModelStore, store_env,
                                                                    saved_model_dir: Path) -> None:
    """Real processes at once: four `registry label` on different labels and two `registry push`
    (each moving `canary`): labels.json keeps every label, history every event."""
    store.publish(saved_model_dir, {"flow_run_id": "race"})
    commands = [("registry", "label", f"lane-{i}", "1") for i in range(4)]
    commands += [("registry", "push", str(saved_model_dir), "--label", "canary") for _ in range(2)]
    processes = [subprocess.Popen([sys.executable, "-m", "cli", *command], cwd=REPO, env={**os.environ, **store_env},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for command in commands]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0] * len(commands), outputs
    assert store.complete_versions() == [1, 2, 3]
    labels = store.labels()
    assert {f"lane-{i}": 1 for i in range(4)}.items() <= labels.items() and labels["canary"] in (2, 3)
    events = [event["event"] for event in store.history()]
    # the two pushes record "published"; the bare publish before them does not
    assert events.count("label") == 6 and events.count("published") == 2, events


def test_labels_history_and_rollback(store: ModelStore, saved_model_dir: Path) -> None:
    from tasks.publish import publish_model

    metrics = {"test_accuracy": 0.991, "test_loss": 0.03, "per_class_accuracy": [0.99] * 10}
    for _ in range(3):
        publish_model(store, saved_model_dir, metrics, LINEAGE, "stable")
    assert store.labels() == {"stable": 3}
    assert store.rollback() == (3, 2)
    assert store.labels()["stable"] == 2
    store.set_label("canary", 3)
    with pytest.raises(VersionNotFound):
        store.set_label("stable", 99)
    with pytest.raises(StoreError, match="invalid label"):
        store.set_label("Not OK", 1)
    events = store.history()
    assert [e["event"] for e in events].count("published") == 3
    assert events[-2]["event"] == "rollback" and events[-2]["previous"] == 3 and events[-2]["version"] == 2
    assert all("time" in e for e in events)
    stable_over_time = [e["version"] for e in events if e["event"] == "label" and e["label"] == "stable"]
    assert stable_over_time == [1, 2, 3, 2]


def test_registry_cli_lists_shows_labels_and_rolls_back(store: ModelStore, saved_model_dir: Path,
                                                       store_env: dict[str, str]) -> None:
    push = run_mnist("registry", "push", str(saved_model_dir), env=store_env)
    assert push.returncode == 0, push.stderr
    assert run_mnist("registry", "push", str(saved_model_dir), env=store_env).returncode == 0
    listing = json.loads(run_mnist("registry", "list", "--json", env=store_env).stdout)
    assert [(row["version"], row["labels"]) for row in listing] == [(1, []), (2, ["stable"])]
    assert json.loads(run_mnist("registry", "show", "2", env=store_env).stdout)["version"] == 2
    assert run_mnist("registry", "rollback", env=store_env).stdout.strip() == "stable: 2 -> 1"
    history = json.loads(run_mnist("registry", "history", "--json", env=store_env).stdout)
    assert history[-1]["event"] == "rollback"
    missing = run_mnist("registry", "show", "7", env=store_env)
    assert missing.returncode == 1 and "version 7" in missing.stderr
    bad = run_mnist("registry", "push", str(REPO), env=store_env)
    assert bad.returncode == 1 and "not a SavedModel directory" in bad.stderr


def assert_only_complete_versions(store: ModelStore) -> None:
    for version in store.complete_versions():
        store.verify(version)


def test_publish_killed_at_any_point_never_shows_a_partial_version(store: ModelStore, saved_model_dir: Path,
                                                                   store_env: dict[str, str]) -> None:
    uploads = 1 + len([p for p in saved_model_dir.rglob("*") if p.is_file()]) + 1  # claim, files, manifest
    for kill_after in range(uploads):
        process = subprocess.Popen([sys.executable, "-m", "tests.slowed_store", "publish", str(saved_model_dir)],
                                   cwd=REPO,
                                   stdout=subprocess.PIPE, text=True, env={**os.environ, **store_env})
        for _ in range(kill_after + 1):
            process.stdout.readline()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        process.stdout.close()
        assert_only_complete_versions(store)
    complete = store.complete_versions()
    assert len(complete) <= 1  # only a kill after the manifest leaves a version
    leftovers = set(store.stored_version_dirs()) - set(complete)
    assert leftovers, "the kills should have left unfinished versions behind"
    assert store.gc(keep=5, grace_seconds=0)["removed_leftovers"] == sorted(leftovers)
    again = publish(store, saved_model_dir)
    assert store.complete_versions() == sorted(complete + [again]) and again > max(leftovers)


def test_publish_rides_out_a_short_outage(tmp_path: Path, saved_model_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "weed"
    weed = start_weed(data, "outage", "outage-secret")
    monkeypatch.setenv("MNIST_S3_ENDPOINT", weed.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "outage")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "outage-secret")
    monkeypatch.setenv("MNIST_RETRY_SECONDS", "60")
    store = ModelStore(StoreSettings())
    store.ensure_bucket()
    real_put = store.client.put_object
    outage = threading.Event()

    def put_then_signal(**kwargs):
        result = real_put(**kwargs)
        outage.set()  # the first upload is through: take the server away now
        return result

    store.client.put_object = put_then_signal
    results: list[object] = []
    publisher = threading.Thread(target=lambda: results.append(publish(store, saved_model_dir)))
    publisher.start()
    assert outage.wait(30)
    weed.stop()
    time.sleep(3)
    restarted = start_weed(data, "outage", "outage-secret", ports=weed.ports)
    try:
        publisher.join(timeout=120)
        assert results == [1]
        assert store.verify(1)["version"] == 1
    finally:
        restarted.stop()


def test_credentials_never_reach_the_store(store: ModelStore, saved_model_dir: Path) -> None:
    from tasks.publish import publish_model

    publish_model(store, saved_model_dir, {"test_accuracy": 0.99, "test_loss": 0.1, "per_class_accuracy": [1] * 10},
                  LINEAGE, "stable")
    for item in store.list_keys(""):
        if not item["Key"].endswith(".data-00000-of-00001"):
            assert S3_SECRET_KEY.encode() not in store.get_bytes(item["Key"]), item["Key"]
