"""The gate, the export round trip and the training flow on a real Prefect API."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from flows.params import TrainingParams
from tasks.data import load_test_set
from tasks.export import ExportError, export_saved_model, saved_model_predict, verify_round_trip
from tasks.gate import GateCheck, accuracy_gate, judge
from tasks.model import build_model
from tasks.recipes import ModelConfig
from tasks.results import TestScores
from tasks.scoring import metrics_from_probabilities
from tests.conftest import run_mnist

REPO = Path(__file__).resolve().parents[2]


def test_gate_passes_at_and_above_the_threshold() -> None:
    verdict = judge([accuracy_gate(TestScores.model_construct(test_accuracy=0.99), 0.99)])
    assert verdict.passed and "passed" in verdict.summary


def test_gate_refusal_names_the_metric_value_and_threshold() -> None:
    verdict = judge([accuracy_gate(TestScores.model_construct(test_accuracy=0.9871), 0.999),
                     GateCheck("other", 1.0, 0.5)])
    assert not verdict.passed
    assert re.search(r"accuracy gate .* failed: 0\.9871 < 0\.9990", verdict.summary)


def test_metrics_count_per_class_and_misclassified() -> None:
    probabilities = np.eye(10)[[0, 1, 2, 2]] * 0.9 + 0.01
    metrics = metrics_from_probabilities(probabilities, np.array([0, 1, 2, 3]))
    assert metrics.test_accuracy == 0.75 and metrics.misclassified == [3]
    assert metrics.per_class_accuracy[3] == 0.0 and metrics.per_class_accuracy[2] == 1.0
    assert metrics.confusion_matrix[3][2] == 1


def test_export_round_trip_matches_keras(smoke_model, prepared_path: Path, tmp_path: Path) -> None:
    x_test, y_test = load_test_set(prepared_path)
    exported = export_saved_model(smoke_model, tmp_path / "mnist" / "1")
    assert (exported / "saved_model.pb").is_file() and not list(tmp_path.glob("mnist/.*partial"))
    assert verify_round_trip(smoke_model, exported, x_test[:100]) <= 1e-5
    signature = tf.saved_model.load(str(exported)).signatures["serving_default"]
    spec = signature.structured_input_signature[1]["image"]
    assert spec.dtype == tf.float32 and spec.shape.as_list() == [None, 28, 28, 1]
    probabilities = saved_model_predict(exported, x_test[:256])
    assert probabilities.shape == (256, 10) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities.argmax(axis=1) == y_test[:256]).mean() > 0.9


def test_export_writes_tf_serving_warmup_requests(smoke_model, prepared_path: Path, tmp_path: Path) -> None:
    from tensorflow_serving.apis import prediction_log_pb2

    from serving.model_server.tensors import from_tensor_proto

    x_test, _ = load_test_set(prepared_path)
    exported = export_saved_model(smoke_model, tmp_path / "mnist" / "1", warmup_images=x_test[:32])
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in
               tf.data.TFRecordDataset(str(exported / "assets.extra" / "tf_serving_warmup_requests"))]
    batches = [from_tensor_proto(r.predict_log.request.inputs["image"]) for r in records]
    assert [b.shape[0] for b in batches] == [1, 8, 32] and np.array_equal(batches[-1], x_test[:32])
    assert all(r.predict_log.request.model_spec.signature_name == "serving_default" for r in records)


def test_round_trip_check_catches_a_different_model(smoke_model, prepared_path: Path, tmp_path: Path) -> None:
    x_test, _ = load_test_set(prepared_path)
    exported = export_saved_model(build_model(ModelConfig()), tmp_path / "1")
    with pytest.raises(ExportError, match="differs from the Keras model"):
        verify_round_trip(smoke_model, exported, x_test[:100])


def test_flow_below_threshold_fails_and_exports_nothing(prefect_api, pipeline_env: Path) -> None:
    from flows.training import training_flow

    state = training_flow(TrainingParams(preset="smoke", threshold=0.999, publish=False), return_state=True)
    assert state.name == "Rejected" and state.is_completed()  # an outcome, not a crash
    assert "accuracy gate" in state.message and "0.9990" in state.message
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # the UI's badge: red, not success's green
        shown = client.read_flow_run(state.state_details.flow_run_id).state
    assert (shown.type.value, shown.name, shown.message) == ("FAILED", "Rejected", state.message)
    assert not (pipeline_env / "mnist").exists()
    run_dir = next((pipeline_env / "runs").iterdir())
    assert (run_dir / "report.md").is_file() and "rejected" in (run_dir / "report.md").read_text()


@pytest.mark.slow
def test_default_flow_on_full_mnist_passes_the_gate(prefect_api, pipeline_env: Path) -> None:
    from flows.training import training_flow

    state = training_flow(TrainingParams(publish=False), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result.test_accuracy >= 0.99
    saved_model = Path(result.saved_model)
    assert saved_model == pipeline_env / "mnist" / "1" and (saved_model / "saved_model.pb").is_file()
    run_dir = Path(result.run_dir)
    for name in ("training_curves.png", "confusion_matrix.png", "misclassified.png", "report.md"):
        assert (run_dir / name).stat().st_size > 1000, name
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert len(evaluation["per_class_accuracy"]) == 10 and evaluation["test_accuracy"] == result.test_accuracy
    assert len(json.loads((run_dir / "history.json").read_text())["val_loss"]) == 3


def test_cli_refuses_bad_values_before_any_work(tmp_path: Path) -> None:
    result = run_mnist("train", "--epochs", "0", "--output", str(tmp_path / "out"), env={})
    assert result.returncode == 2
    assert "--epochs: Input should be greater than or equal to 1" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_cli_gate_failure_is_one_line_and_non_zero(pipeline_env: Path, mnist_dir: Path, cache_dir: Path,
                                                   tmp_path: Path) -> None:
    """The acceptance command, with the embedded S3 store it starts and stops itself."""
    result = run_mnist("train", "--threshold", "0.9999", "--epochs", "1", "--output", str(pipeline_env),
                     env={"MNIST_DATA_DIR": str(mnist_dir), "MNIST_CACHE_DIR": str(cache_dir),
                          "MNIST_STATE_DIR": str(tmp_path / "state"), "MNIST_S3_ENDPOINT": ""})
    assert result.returncode == 1, result.stderr[-2000:]
    [message] = [line for line in result.stderr.splitlines() if line.startswith("mnist train: ")]
    assert "accuracy gate" in message and "0.9999" in message
    assert "Traceback" not in result.stderr + result.stdout
    assert not (pipeline_env / "mnist").exists()
    assert not (tmp_path / "state" / "seaweedfs" / "store.json").exists(), "the embedded store was left running"


def test_lineage_reads_as_settings_not_python_dicts() -> None:
    from tasks.report import readable

    config = {"epochs": 3, "model": {"filters_1": 32, "dropout": 0.25}, "train_limit": None}
    shown = readable(config)
    assert shown == "epochs `3`, model (filters_1 `32`, dropout `0.25`), train_limit none"
    assert "{" not in shown and "'" not in shown and readable({}) == "none"


def test_the_accuracy_trend_shows_differences_and_every_point_whole() -> None:
    from tasks.report import accuracy_tick, trend_limits

    low, high = trend_limits([0.9921, 0.9934, float("nan"), 0.9928])
    assert 0.99 < low < 0.9921 and 0.9934 < high <= 1.0
    assert trend_limits([]) == (0.0, 1.0)
    for points in ([1.0, 1.0], [0.9921, 1.0], [0.5, 1.0]):  # a slice at 1.0 is not cut by the top edge
        low, high = trend_limits(points)
        assert low < min(points) and high - 1.0 >= (high - low) / 20, (points, low, high)
    assert accuracy_tick(1.0, 0) == "1" and accuracy_tick(0.998, 0) == "0.998" and accuracy_tick(1.0005, 0) == ""
