"""Drift detection on real logged traffic: a version published with its reference statistics,
served by the local server behind the gateway; the mnist-drift flow on a real Prefect API raises
``mnist.drift.detected`` for thickened digits and not for unshifted ones."""

from __future__ import annotations

import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from flows.drift import drift_flow
from flows.params import DriftParams
from mnist_client.client import Target, predict_call
from tasks.data import load_test_set
from tasks.drift import REFERENCE_FILE, DriftThresholds, compare, reference_statistics, summarise
from tasks.export import export_saved_model
from tasks.publish import publish_model
from tasks.results import DriftRun
from tests.conftest import prefect_events, start_model_server
from tests.serving.gateway.test_gateway import start_gateway, wait_for


@pytest.fixture(scope="module")
def test_digits(prepared_path: Path) -> np.ndarray:
    return load_test_set(prepared_path)[0]


@pytest.fixture(scope="module")
def referenced_model(smoke_model, test_digits: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SavedModel exported as the training flow exports it: with reference statistics."""
    sample = test_digits[:2000]
    reference = reference_statistics(sample, smoke_model.predict(sample, verbose=0), "MNIST test set, first 2000")
    return export_saved_model(smoke_model, tmp_path_factory.mktemp("referenced") / "mnist" / "1",
                              reference=reference)


def thickened(images: np.ndarray) -> np.ndarray:
    """Strokes one pixel bolder all round (a 3x3 maximum): what a thicker pen or another scanner gives."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return np.max([padded[:, 1 + dy:29 + dy, 1 + dx:29 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)


def served_traffic(store, referenced_model: Path, tmp_path: Path, images: np.ndarray) -> int:
    """Publish the model, serve it behind the gateway and send ``images`` in requests of ten."""
    published = publish_model(store, referenced_model, {"test_accuracy": 0.5, "test_loss": 1.0,
                                                        "per_class_accuracy": [0.5] * 10}, {}, "stable")
    base = tmp_path / "models" / "mnist"
    shutil.copytree(referenced_model, base / str(published.version))
    server, address = start_model_server(base)
    gateway = start_gateway(address)
    try:
        for start in range(0, len(images), 10):
            predict_call(images[start:start + 10], Target(f"127.0.0.1:{gateway.port}"))
        wait_for(lambda: gateway.logger.written_records == (len(images) + 9) // 10)
    finally:
        gateway.stop()
        server.stop(grace=1)
    return published.version


def run_drift(**params) -> tuple[str, DriftRun]:
    state = drift_flow(DriftParams(window_hours=1, **params), return_state=True)
    assert state.is_completed(), state.message
    return state.message, state.result()


def test_thickened_digits_raise_the_drift_event(prefect_api, store, pipeline_env, referenced_model: Path,
                                                test_digits: np.ndarray, tmp_path: Path) -> None:
    assert (referenced_model / REFERENCE_FILE).is_file()
    since = datetime.now(timezone.utc) - timedelta(seconds=5)
    version = served_traffic(store, referenced_model, tmp_path, thickened(test_digits[2000:2400]))
    message, result = run_drift()
    verdict = result.results[version]
    assert verdict.verdict == "drift" and "ink_fraction" in verdict.drifted, verdict
    assert verdict.images == 400 and message.startswith(f"version {version}: drift")
    events = prefect_events("mnist.drift.detected", since)
    assert events, "mnist.drift.detected did not reach the Prefect API"
    payload = events[0]["payload"]
    assert payload["version"] == version and payload["images"] == 400
    assert payload["scores"]["ink_fraction"]["statistic"] > 0.3
    assert events[0]["resource"]["prefect.resource.id"] == "mnist.model.mnist"


def test_unshifted_traffic_is_no_drift_and_too_little_is_no_verdict(prefect_api, store, pipeline_env,
                                                                    referenced_model: Path, test_digits: np.ndarray,
                                                                    tmp_path: Path) -> None:
    since = datetime.now(timezone.utc)  # the other test's event must not count
    version = served_traffic(store, referenced_model, tmp_path, test_digits[2000:2400])
    verdict = run_drift()[1].results[version]
    assert verdict.verdict == "no drift", verdict
    assert all(score.statistic < 0.1 for score in verdict.scores.values())
    too_few = run_drift(min_requests=1000)[1].results[version]
    assert too_few.verdict == "not enough data" and "400 logged images" in (too_few.reason or "")
    time.sleep(2)
    assert prefect_events("mnist.drift.detected", since, expect=False) == []


def test_a_statistic_must_be_both_significant_and_large_to_count() -> None:
    rng = np.random.default_rng(0)
    reference = {"inputs": {name: rng.normal(0.2, 0.05, 2000).tolist()
                            for name in ("ink_fraction", "intensity", "box_height", "box_width")},
                 "confidence": rng.uniform(0.9, 1.0, 2000).tolist(), "predicted_class": [0.1] * 10}
    images = np.zeros((300, 28, 28, 1), np.float32)
    images[:, 8:20, 10:18] = 1.0
    probabilities = np.full((300, 10), 0.0, np.float32)
    probabilities[np.arange(300), np.arange(300) % 10] = rng.uniform(0.9, 1.0, 300)
    result = compare(reference, summarise(images, probabilities), DriftThresholds())
    assert result.scores["predicted_class"].drift is False  # uniform classes, as the reference
    assert result.scores["confidence"].drift is False  # drawn as the reference's
    assert result.scores["ink_fraction"].drift is True  # 96 ink pixels: 0.12 against 0.2 +- 0.05


def test_a_busy_day_is_summarised_in_bounded_memory() -> None:
    """250,000 logged images summarised a record at a time: the count and the predicted classes
    exact, the statistics a uniform sample of at most DRIFT_SAMPLE, never more rows held at once."""
    from tasks.drift import Reservoir, TrafficSummary

    rng = np.random.default_rng(0)
    summary = TrafficSummary(reservoir=Reservoir(10_000, seed=1))
    image = np.zeros((1, 28, 28, 1), np.float32)
    image[0, 8:20, 10:18] = 1.0
    classes = np.zeros(10, np.int64)
    largest = 0
    for chunk in range(250):
        # the confidence says which part of the day a row came from: 0.5 + chunk / 1000
        answers = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 1000)] * np.float32(0.5 + chunk / 1000)
        classes += np.bincount(answers.argmax(axis=1), minlength=10)
        summary.add(np.repeat(image, 1000, axis=0), answers)
        largest = max(largest, summary.reservoir.buffered)
    arrays = summary.arrays()
    assert int(arrays["count"]) == 250_000 and arrays["class_counts"].tolist() == classes.tolist()
    assert len(arrays["confidence"]) == 10_000 and largest <= 2 * 10_000 + 4096
    assert np.allclose(arrays["ink_fraction"], 96 / 784)
    # uniform over the day: as many sampled rows from its first half as from its second
    first_half = (arrays["confidence"] < 0.625).mean()
    assert 0.47 < first_half < 0.53, first_half
