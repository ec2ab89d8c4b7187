"""Evaluation stage: test-set metrics and the accuracy gate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import keras
import numpy as np

from tasks.data import NUM_CLASSES
from tasks.results import Evaluation, FailedCheck, SliceScores, StableScores, TestScores, Verdict


class GateFailed(Exception):
    """The candidate model did not meet the gate; nothing may be exported or published."""


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


@dataclass(frozen=True)
class GateCheck:
    """One comparison of the gate: ``value`` must be >= ``limit`` (<= with ``at_most``)."""

    name: str
    value: float
    limit: float
    at_most: bool = False

    @property
    def passed(self) -> bool:
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def describe(self) -> str:
        verdict = "passed" if self.passed else "failed"
        relation = {(False, True): ">=", (False, False): "<", (True, True): "<=", (True, False): ">"}[
            (self.at_most, self.passed)]
        return f"{self.name} {verdict}: {self.value:.4f} {relation} {self.limit:.4f}"


# --- poisoning: what accuracy on clean digits cannot see -------------------------------------
# A backdoor keeps clean accuracy and flips answers when a trigger is present. The scan stamps a
# small white square in each corner and the centre of trusted test digits and counts how often
# each model's answer changes; a candidate far more sensitive than stable to one of them is
# rejected. It also counts answers that moved, on the same trusted digits, to one digit.
TRIGGER_PATCHES = {"top-left": (1, 1), "top-right": (1, 23), "bottom-left": (23, 1), "bottom-right": (23, 23),
                   "centre": (12, 12)}
PATCH_SIZE = 4
SCAN_IMAGES = 2000  # trusted test digits per patch: enough to see a flip rate of a few percent


def patched(images: np.ndarray, corner: tuple[int, int]) -> np.ndarray:
    """Digits [N,28,28,1] in [0,1] with a white PATCH_SIZE square at ``corner`` (row, column)."""
    stamped = images.copy()
    row, column = corner
    stamped[:, row:row + PATCH_SIZE, column:column + PATCH_SIZE, :] = 1.0
    return stamped


def trigger_flips(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> dict[str, float]:
    """Per patch, the share of ``images`` whose answer changes when the patch is stamped on."""
    images = images[:SCAN_IMAGES]
    clean = predict(images).argmax(axis=1)
    return {name: float((predict(patched(images, corner)).argmax(axis=1) != clean).mean())
            for name, corner in TRIGGER_PATCHES.items()}


def moved_to_digit(candidate: Evaluation, champion: StableScores) -> list[float]:
    """Per digit, the share of trusted test digits that stable answers right and the candidate
    answers wrong, as this digit: answers pulled towards one digit, as label flipping does."""
    answers = np.asarray(candidate.predictions)
    newly_wrong = np.zeros(len(answers), dtype=bool)
    newly_wrong[candidate.misclassified] = True
    newly_wrong[champion.misclassified] = False
    return [float((newly_wrong & (answers == digit)).mean()) for digit in range(NUM_CLASSES)]


def poisoning_checks(candidate: Evaluation, champion: StableScores | None, moved_margin: float,
                     trigger_margin: float) -> list[GateCheck]:
    """Against ``stable`` on trusted (MNIST test) digits: answers newly wrong as any one digit, at
    most ``moved_margin`` of them; each trigger patch's flip rate, at most stable's + ``trigger_margin``."""
    if champion is None:
        return []
    moved = moved_to_digit(candidate, champion)
    digit = int(np.argmax(moved))
    checks = [GateCheck(f"MNIST test digits stable v{champion.version} gets right, newly answered {digit}",
                        moved[digit], moved_margin, at_most=True)]
    checks += [GateCheck(f"trigger scan: {name} patch flips answers (stable: {champion.trigger_flips[name]:.4f}"
                         f" + {trigger_margin:g})", rate, champion.trigger_flips[name] + trigger_margin,
                         at_most=True)
               for name, rate in candidate.trigger_flips.items()]
    return checks


def accuracy_gate(metrics: TestScores, threshold: float) -> GateCheck:
    return GateCheck("accuracy gate (test_accuracy >= threshold)", metrics.test_accuracy, threshold)


def champion_checks(candidate: TestScores, champion: StableScores | None, accuracy_margin: float,
                    class_margin: float) -> list[GateCheck]:
    """Challenger vs the ``stable`` champion on the same test set: overall accuracy
    may drop by at most ``accuracy_margin``, each digit's by at most ``class_margin``."""
    if champion is None:
        return []
    checks = [GateCheck(f"not worse than stable v{champion.version} (accuracy - {accuracy_margin:g})",
                        candidate.test_accuracy, champion.test_accuracy - accuracy_margin)]
    checks += [GateCheck(f"digit {digit} vs stable (class accuracy - {class_margin:g})", mine, theirs - class_margin)
               for digit, (mine, theirs) in enumerate(zip(candidate.per_class_accuracy,
                                                           champion.per_class_accuracy))]
    return checks


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


def slice_checks(candidate: Evaluation, champion: StableScores | None, threshold: float, margin: float,
                 min_size: int) -> tuple[list[GateCheck], list[str]]:
    """Each new source's test slice with at least ``min_size`` examples must reach ``threshold``
    and lose at most ``margin`` against ``stable`` on the same images; smaller slices are
    reported, not gated. Returns the checks and the notes on slices too small to judge."""
    checks, notes = [], []
    for source, scores in sorted(candidate.slices.items()):
        if scores.num_examples < min_size:
            notes.append(f"slice {source}: {scores.num_examples} test examples < {min_size}, reported, not gated")
            continue
        checks.append(GateCheck(f"slice {source} accuracy >= slice threshold", scores.accuracy, threshold))
        if champion is not None and source in champion.slices:
            checks.append(GateCheck(f"slice {source} not worse than stable v{champion.version} (- {margin:g})",
                                    scores.accuracy, champion.slices[source].accuracy - margin))
    return checks, notes


def short_reason(checks: list[GateCheck], shown: int = 2) -> str:
    """The failing checks in one short line, for a state message and the runs list; the report
    tables every check. Empty when nothing failed."""
    failed = [check.describe() for check in checks if not check.passed]
    more = len(failed) - shown
    return "; ".join(failed[:shown]) + (f"; and {more} more failing check{'s' * (more > 1)} (see the report)"
                                        if more > 0 else "")


def enforce_gate(checks: list[GateCheck]) -> str:
    """Raise GateFailed naming every failed check; return the summary otherwise."""
    failed = [check.describe() for check in checks if not check.passed]
    if failed:
        raise GateFailed("; ".join(failed))
    return "; ".join(check.describe() for check in checks)


# --- Prefect tasks ------------------------------------------------------------
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from prefect import get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.states import Completed, State  # noqa: E402


@task(name="evaluate", timeout_seconds=900)
def evaluate(model_path: str, prepared_path: str, run_dir: str,
             slices: dict[str, SliceScores] | None = None) -> Evaluation:
    """Test-set metrics, saved as JSON; the test set is used here and nowhere in training.
    ``slices``: the test slices' scores when they were scored elsewhere (on Dask)."""
    from tasks.data import load_test_set
    from tasks.model import load_saved_model

    x_test, y_test = load_test_set(Path(prepared_path))
    model = load_saved_model(model_path)
    started = time.perf_counter()
    def predict(images: np.ndarray) -> np.ndarray:
        return model.predict(images, batch_size=1024, verbose=0)

    scores = evaluate_model(model, x_test, y_test)
    flips = trigger_flips(predict, x_test)
    seconds = round(time.perf_counter() - started, 3)  # a run's cost outside fit
    metrics = Evaluation(**dict(scores), trigger_flips=flips, evaluation_seconds=seconds,
                         slices=slices if slices is not None else slice_scores(predict, Path(prepared_path)))
    Path(run_dir, "evaluation.json").write_text(metrics.model_dump_json(indent=2))
    logger = get_run_logger()
    logger.info("test accuracy %.4f, test loss %.4f", metrics.test_accuracy, metrics.test_loss)
    for source, sliced in metrics.slices.items():
        logger.info("slice %s: accuracy %.4f on %d test examples", source, sliced.accuracy, sliced.num_examples)
    return metrics


@task(name="evaluate-stable", timeout_seconds=600)
def evaluate_stable(prepared_path: str) -> StableScores | None:
    """Re-evaluate the current ``stable`` version on this run's test set, so the
    comparison is like for like; None when nothing is stable yet."""
    import tempfile

    from storage.models import ModelStore, StoreSettings
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
        predict = saved_model_predictor(Path(scratch))  # loaded once for the test set, the slices and the scan
        scores = metrics_from_probabilities(predict(x_test), y_test)
        stable = StableScores(version=version, test_accuracy=scores.test_accuracy,
                              per_class_accuracy=scores.per_class_accuracy, misclassified=scores.misclassified,
                              slices=slice_scores(predict, Path(prepared_path)),
                              trigger_flips=trigger_flips(predict, x_test))
    get_run_logger().info("stable v%d scores %.4f on this test set", version, stable.test_accuracy)
    return stable


REJECTED = "Rejected"  # the state name of a gate task and a training run whose candidate was rejected


@task(name="gate")
def gate(checks: list[GateCheck]) -> Verdict | State:
    """Judge the candidate; the verdict goes to the log and a markdown artifact.

    A rejection is an expected outcome, not a crash: the task ends in a ``Rejected`` state
    (of type COMPLETED) holding the verdict, and logs a warning, so its state and its log say
    the same; the flow then ends ``Rejected`` with the one-line reason, without a traceback.
    """
    logger = get_run_logger()
    try:
        summary, passed = enforce_gate(checks), True
    except GateFailed as rejection:
        summary, passed = f"rejected: {rejection}", False
    (logger.info if passed else logger.warning)("gate %s", summary)
    failing_first = sorted(checks, key=lambda check: check.passed)
    table = "\n".join(f"| {c.name} | {c.value:.4f} | {c.limit:.4f} | {'pass' if c.passed else 'FAIL'} |"
                      for c in failing_first)
    create_table_artifact([{"check": c.name, "value": round(c.value, 5), "limit": round(c.limit, 5),
                            "verdict": "pass" if c.passed else "FAIL"} for c in failing_first],
                          key="mnist-gate-checks", description="Gate checks, including the comparison with stable")
    create_markdown_artifact(
        f"# Gate: {'passed' if passed else 'rejected'}\n\n{summary if passed else short_reason(checks)}\n\n"
        f"| check | value | limit | verdict |\n|---|---|---|---|\n{table}\n",
        key="mnist-gate", description="Gate verdict")
    verdict = Verdict(passed=passed, summary=summary, reason=short_reason(checks),
                      checks=[c.describe() for c in checks],
                      failed=[FailedCheck(check=c.name, value=c.value, limit=c.limit, at_most=c.at_most)
                              for c in checks if not c.passed])
    return verdict if passed else Completed(name=REJECTED, message=verdict.reason, data=verdict)
