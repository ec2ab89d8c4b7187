"""Scoring: a model's answers on the test set, each new source's test slice, and the shortcuts
reverse-engineered from it for the backdoor inspection; ``stable`` scored the same way. Judging the
scores is ``tasks/gate.py``'s."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable

import keras
import numpy as np
from prefect import get_run_logger, task

from tasks.data import NUM_CLASSES
from tasks.results import Evaluation, SliceScores, StableScores, TestScores


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def metrics_from_probabilities(probabilities: np.ndarray, y_true: np.ndarray) -> TestScores:
    """Loss, accuracy, per-class accuracy, confusion matrix and misclassified indices."""
    y_pred = probabilities.argmax(axis=1)
    matrix = confusion_matrix(y_true, y_pred)
    per_class = matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)
    picked = probabilities[np.arange(len(y_true)), y_true]
    loss = float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0))))
    return TestScores(
        test_loss=loss,
        test_accuracy=float((y_pred == y_true).mean()),
        per_class_accuracy=[float(v) for v in per_class],
        confusion_matrix=matrix.tolist(),
        misclassified=np.flatnonzero(y_pred != y_true).tolist(),
        predictions=y_pred.tolist(),
        num_examples=int(len(y_true)),
    )


def evaluate_model(model: keras.Model, x_test: np.ndarray, y_test: np.ndarray) -> TestScores:
    probabilities = model.predict(x_test, batch_size=1024, verbose=0)
    return metrics_from_probabilities(probabilities, y_test)


def scores_of(matrix: np.ndarray) -> SliceScores:
    """Size, accuracy, per-class accuracy and the matrix itself, from a confusion matrix."""
    count = int(matrix.sum())
    return SliceScores(num_examples=count, accuracy=float(matrix.trace() / count) if count else 0.0,
                       per_class_accuracy=[float(v) for v in matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)],
                       confusion_matrix=matrix.tolist())


def confusion_by_source(predict: Callable[[np.ndarray], np.ndarray],
                        chunks: Iterable[tuple[str, np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each source's confusion matrix over (source, model input, labels) chunks: matrices add up,
    so a slice is never whole in memory, however large it grows."""
    matrices: dict[str, np.ndarray] = {}
    for source, images, labels in chunks:
        chunk = confusion_matrix(labels, predict(images).argmax(axis=1))
        matrices[source] = matrices[source] + chunk if source in matrices else chunk
    return matrices


def slice_scores(predict: Callable[[np.ndarray], np.ndarray], prepared_path: Path) -> dict[str, SliceScores]:
    """Every new source's test slice scored a chunk at a time."""
    from tasks.data import slice_batches

    matrices = confusion_by_source(predict, slice_batches(prepared_path))
    return {source: scores_of(matrix) for source, matrix in sorted(matrices.items())}


@task(name="evaluate", timeout_seconds=900)
def evaluate(model_path: str, prepared_path: str, run_dir: str,
             slices: dict[str, SliceScores] | None = None, inspect: bool = True) -> Evaluation:
    """Test-set metrics, saved as JSON; the test set is used here and nowhere in training.
    ``slices``: the test slices' scores when they were scored elsewhere (on Dask). ``inspect``:
    reverse-engineer the candidate's shortcuts for the backdoor inspection (a run with a stable
    to compare with)."""
    from tasks.data import load_test_set
    from tasks.model import load_saved_model

    x_test, y_test = load_test_set(Path(prepared_path))
    model = load_saved_model(model_path)
    started = time.perf_counter()
    def predict(images: np.ndarray) -> np.ndarray:
        return model.predict(images, batch_size=1024, verbose=0)

    scores = evaluate_model(model, x_test, y_test)
    triggers_path = Path(run_dir, "triggers.npz")
    shortcuts, sizes = (inspect_for_backdoor(model, predict, x_test, y_test, triggers_path) if inspect
                        else ([], []))
    seconds = round(time.perf_counter() - started, 3)  # a run's cost outside fit
    metrics = Evaluation(**dict(scores), shortcuts=shortcuts, shortcut_sizes=sizes,
                         triggers_path=str(triggers_path) if inspect else "", evaluation_seconds=seconds,
                         slices=slices if slices is not None else slice_scores(predict, Path(prepared_path)))
    Path(run_dir, "evaluation.json").write_text(metrics.model_dump_json(indent=2))
    logger = get_run_logger()
    logger.info("test accuracy %.4f, test loss %.4f", metrics.test_accuracy, metrics.test_loss)
    for source, sliced in metrics.slices.items():
        logger.info("slice %s: accuracy %.4f on %d test examples", source, sliced.accuracy, sliced.num_examples)
    return metrics


def inspect_for_backdoor(model: Any, predict: Callable[[np.ndarray], np.ndarray], x_test: np.ndarray,
                         y_test: np.ndarray, triggers_path: Path) -> tuple[list[float], list[float]]:
    """Reverse-engineer the candidate's shortcut to each digit on trusted digits and save them for
    stable to be tried on. Returns how far the candidate follows each on digits not used, and the
    size of each change (pixels)."""
    from tasks.backdoor import MEASURE_ON, OPTIMISE_ON, reverse_engineer, sent_to_digit

    triggers = reverse_engineer(model, x_test[OPTIMISE_ON], y_test[OPTIMISE_ON])
    triggers.save(triggers_path)
    return sent_to_digit(predict, x_test[MEASURE_ON], y_test[MEASURE_ON], triggers), triggers.norms


@task(name="evaluate-stable", timeout_seconds=600)
def evaluate_stable(prepared_path: str, triggers_path: str) -> StableScores | None:
    """Re-evaluate the current ``stable`` version on this run's test set, so the
    comparison is like for like, and try the candidate's shortcuts (``triggers_path``; "" when
    not inspected) on it; None when nothing is stable yet."""
    import tempfile

    from storage.models import ModelStore
    from storage.settings import StoreSettings
    from tasks.backdoor import MEASURE_ON, Triggers, sent_to_digit
    from tasks.data import load_test_set
    from tasks.export import saved_model_predictor

    store = ModelStore(StoreSettings())
    store.ensure_bucket()
    version = store.labels().get("stable")
    if version is None:
        get_run_logger().info("no stable version yet: the absolute gate alone decides")
        return None
    x_test, y_test = load_test_set(Path(prepared_path))
    with tempfile.TemporaryDirectory() as scratch:
        store.download(version, Path(scratch))
        predict = saved_model_predictor(Path(scratch))  # loaded once for the test set, slices and shortcuts
        scores = metrics_from_probabilities(predict(x_test), y_test)
        stable = StableScores(version=version, test_accuracy=scores.test_accuracy,
                              per_class_accuracy=scores.per_class_accuracy, misclassified=scores.misclassified,
                              slices=slice_scores(predict, Path(prepared_path)),
                              shortcuts_followed=sent_to_digit(predict, x_test[MEASURE_ON], y_test[MEASURE_ON],
                                                               Triggers.load(Path(triggers_path)))
                              if triggers_path else [])
    get_run_logger().info("stable v%d scores %.4f on this test set", version, stable.test_accuracy)
    return stable
