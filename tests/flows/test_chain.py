"""The chain end to end: live check after publish, export-only serving, and make run's chain."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flows.params import TrainingParams
from mnist_client.client import predict
from storage.embedded import free_port, stop_process
from storage.models import ModelStore
from tasks.data import load_test_set
from tasks.publish import compare_golden
from tests.conftest import REPO, start_model_server

# Champion margins wide open: these tests are about what happens after the gate.
AFTER_GATE = {"preset": "smoke", "threshold": 0.5, "accuracy_margin": 1.0, "class_margin": 1.0, "moved_margin": 1.0,
              "shortcut_follow": 0.0}


def test_golden_comparison_catches_disagreement() -> None:
    offline = np.eye(10)[[1, 2, 3]]
    assert compare_golden(offline + 1e-6, offline) is None
    assert "1 digits disagree" in compare_golden(np.eye(10)[[1, 2, 4]], offline)


def test_failed_live_check_moves_stable_back_and_fails_the_run(prefect_api, pipeline_env: Path, store: ModelStore,
                                                               saved_model_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.training import training_flow
    from tasks.publish import publish_model

    metrics = {"test_accuracy": 0.97, "test_loss": 0.1, "per_class_accuracy": [0.97] * 10}
    publish_model(store, saved_model_dir, metrics, {"flow_run_id": "seeded"}, "stable")
    server, address = start_model_server(tmp_path / "empty")  # never fed a new version: no sync
    monkeypatch.setenv("MNIST_SERVING_ADDRESS", address)
    monkeypatch.setenv("MNIST_LIVE_CHECK_TIMEOUT", "3")
    try:
        state = training_flow(TrainingParams(**AFTER_GATE), return_state=True)
    finally:
        server.stop(grace=1)
    assert state.is_failed()
    assert "live check failed" in state.message and "did not become AVAILABLE" in state.message
    assert store.labels() == {"stable": 1} and store.complete_versions() == [1, 2]
    rollback = [e for e in store.history() if e["event"] == "rollback"][-1]
    assert (rollback["previous"], rollback["version"]) == (2, 1) and "AVAILABLE" in rollback["reason"]


def test_a_first_version_that_fails_its_live_check_keeps_no_label(store: ModelStore, saved_model_dir: Path) -> None:
    from tasks.publish import publish_model, undo_publish

    metrics = {"test_accuracy": 0.97, "test_loss": 0.1, "per_class_accuracy": [0.97] * 10}
    publish_model(store, saved_model_dir, metrics, {"flow_run_id": "first"}, "stable")
    assert store.rollback_target("stable") is None  # nothing before version 1
    assert undo_publish(store, "stable", "first", "did not become AVAILABLE") == "label stable removed"
    assert store.labels() == {} and store.complete_versions() == [1]  # the version stays, unlabelled
    removal = [e for e in store.history() if e["event"] == "label"][-1]
    assert (removal["label"], removal["version"], removal["reason"]) == ("stable", None, "did not become AVAILABLE")


def test_export_without_publish_is_servable(mnist_dir: Path, cache_dir: Path, tmp_path: Path,
                                            prepared_path: Path) -> None:
    env = {**os.environ, "MNIST_DATA_DIR": str(mnist_dir), "MNIST_CACHE_DIR": str(cache_dir),
           "MNIST_STATE_DIR": str(tmp_path / "state"), "MNIST_S3_ENDPOINT": "http://127.0.0.1:9"}
    out = tmp_path / "out"
    trained = subprocess.run([sys.executable, "-m", "cli", "train", "--preset", "smoke", "--threshold", "0.5",
                              "--no-publish", "--output", str(out)], capture_output=True, text=True, env=env,
                             cwd=REPO, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "I0000" not in trained.stderr and "cuInit" not in trained.stderr  # TensorFlow's C++ lines held back
    assert (out / "mnist" / "1" / "saved_model.pb").is_file() and "published" not in trained.stdout
    assert "reject" not in (trained.stdout + trained.stderr).lower()  # a passing run says nothing of rejections
    assert not (tmp_path / "state").exists()  # S3 untouched: not even the embedded store started
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port),
                               "--model-base-path", str(out / "mnist")], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, cwd=REPO, env=env, start_new_session=True)
    try:
        assert re.search(r"listening on .*'mnist': \[1\]", server.stdout.readline())
        images, labels = load_test_set(prepared_path)
        answers = predict(images[:50], address=f"127.0.0.1:{port}")
        assert np.mean([a["digit"] for a in answers] == labels[:50]) > 0.5
    finally:
        stop_process(server.pid)
        server.wait(timeout=10)
        server.stdout.close()


def test_run_chain_publishes_serves_and_answers_over_grpc(prefect_api, pipeline_env: Path, store: ModelStore,
                                                         tmp_path: Path) -> None:
    from flows.chain import run_chain

    with run_chain(TrainingParams(**AFTER_GATE), tmp_path / "state", queries=(0, 5)) as (result, answers):
        running = subprocess.run(["pgrep", "-f", f"{tmp_path}/state/serving"], capture_output=True, text=True)
        assert running.stdout.strip(), "the answers came after the stack stopped"
    assert result.published.version == 1 and store.labels() == {"stable": 1}
    assert [a["label"] for a in answers] == [7, 2, 1, 0, 4]
    assert all(a["version"] == 1 for a in answers)
    assert len({a["request_id"] for a in answers}) == 1 and [a["index"] for a in answers] == [0, 1, 2, 3, 4]
    assert (tmp_path / "state" / "serving" / "mnist" / "1" / "saved_model.pb").is_file()
    from storage.logs import PredictionLogStore, days_back
    from storage.settings import TrafficSettings

    logs = PredictionLogStore(TrafficSettings())
    logged = [entry for key in logs.batch_keys(days_back(1)) for entry, _ in logs.read_batch(key)]
    assert answers[0]["request_id"] in [entry.request_id for entry in logged]  # flushed when the chain stopped
    leftover = subprocess.run(["pgrep", "-f", f"{tmp_path}/state/serving"], capture_output=True, text=True)
    assert leftover.stdout == "", "the chain left its server or sync running"


def test_run_chain_names_the_part_of_the_stack_that_did_not_start(prefect_api, pipeline_env: Path, store: ModelStore,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's port is taken before it binds: the run says so from the gateway's own log, not
    as the live check's timeout, and the first version it published keeps no label."""
    import serving.stack
    from flows.chain import run_chain
    from serving.stack import StackError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        picks = iter([taken.getsockname()[1]])  # the stack's first pick is the gateway's gRPC port
        monkeypatch.setattr(serving.stack, "free_port", lambda: next(picks, None) or free_port())
        monkeypatch.setenv("MNIST_LIVE_CHECK_TIMEOUT", "3")
        with pytest.raises(StackError, match=r"mnist gateway did not start \(exit 1\): .*address already in use"):
            with run_chain(TrainingParams(**AFTER_GATE), tmp_path / "state", queries=(0, 5)):
                pass
    assert store.complete_versions() == [1] and store.labels() == {}
    leftover = subprocess.run(["pgrep", "-f", f"{tmp_path}/state/serving"], capture_output=True, text=True)
    assert leftover.stdout == "", "the chain left its server or sync running"
