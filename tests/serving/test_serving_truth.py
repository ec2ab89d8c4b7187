"""The serving-truth check against a real local server and a real registry: a version that failed
to load and a label the server does not know are caught, named, and raise the event; a server that
serves what the registry says passes."""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

from flows.serving_check import serving_check_flow
from serving.model_server.model_config import single_model_config
from tasks.publish import publish_model
from tests.conftest import prefect_events, run_mnist, start_model_server

METRICS = {"test_accuracy": 0.5, "test_loss": 1.0, "per_class_accuracy": [0.5] * 10}


def serve_with_labels(base: Path, labels: dict[str, int]):
    server, address = start_model_server(base)
    config = single_model_config("mnist", base.resolve())
    config.model_config_list.config[0].model_version_policy.all.SetInParent()
    server.manager.apply_config(config)  # every version loads first: TF Serving labels only AVAILABLE ones
    for label, version in labels.items():
        config.model_config_list.config[0].version_labels[label] = version
    server.manager.apply_config(config)
    return server, address


def test_a_version_that_did_not_load_and_an_unknown_label_are_caught(prefect_api, store, saved_model_dir: Path,
                                                                     tmp_path: Path, monkeypatch) -> None:
    assert publish_model(store, saved_model_dir, METRICS, {}, "stable").version == 1
    broken = tmp_path / "broken"
    shutil.copytree(saved_model_dir, broken)
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")  # published intact, fails to load
    assert publish_model(store, broken, METRICS, {}, "canary").version == 2
    base = tmp_path / "served" / "mnist"
    shutil.copytree(saved_model_dir, base / "1")
    shutil.copytree(broken, base / "2")
    server, address = serve_with_labels(base, {"stable": 1})  # canary cannot be applied: v2 never loaded
    since = datetime.now(timezone.utc)
    try:
        result = run_mnist("check", "--server", address, "--grace-seconds", "1")
        monkeypatch.setenv("MNIST_SERVING_ADDRESS", address)
        state = serving_check_flow(grace_seconds=1, return_state=True)
    finally:
        server.stop(grace=1)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "version 2, labelled canary, is END (failed to load: " in result.stderr
    assert "label canary: the registry says version 2, the server refuses it" in result.stderr
    assert "label stable" not in result.stderr  # that one agrees
    assert state.is_failed() and "version 2" in state.message
    [event] = prefect_events("mnist.serving.mismatch", since)
    assert event["payload"]["server"] == address and len(event["payload"]["problems"]) == 2


def test_a_server_serving_the_registry_passes(store, saved_model_dir: Path, tmp_path: Path) -> None:
    publish_model(store, saved_model_dir, METRICS, {}, "stable")
    base = tmp_path / "served" / "mnist"
    shutil.copytree(saved_model_dir, base / "1")
    server, address = serve_with_labels(base, {"stable": 1})
    try:
        result = run_mnist("check", "--server", address, "--grace-seconds", "0")
    finally:
        server.stop(grace=1)
    assert result.returncode == 0, result.stderr
    assert "serves what the registry says (stable -> v1)" in result.stdout
