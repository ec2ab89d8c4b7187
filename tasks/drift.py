"""Drift stage: is the served traffic still like what the model was made for?

Every exported version carries reference statistics (``assets.extra/reference_stats.json``):
for a sample of MNIST's test digits, per-image input statistics (ink fraction, ink intensity,
stroke box height and width), the version's predicted-class distribution and its confidence.
The drift flow compares a window of logged traffic with the reference of the version that
answered it, with scipy.stats: a two-sample Kolmogorov-Smirnov test per input statistic and
for the confidence, a chi-square test for the predicted classes. A statistic drifts when the
test is significant (p < ``alpha``) *and* the effect is large enough to matter (KS statistic,
or total variation distance of the class distribution, >= ``min_effect``): with thousands of
requests a trivial difference is significant, and a verdict must mean something.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from storage.errors import MnistError
from tasks.digits import ink_statistics
from tasks.results import DriftScore, DriftVerdict

if TYPE_CHECKING:
    from storage.live_check import FirstLiveChecks

DRIFT_SAMPLE = 100_000  # rows kept per version for the tests: a day of a busy service stays this size
FLUSH = 4096  # logged images summarised at a time


class Reservoir:
    """A uniform random sample of at most ``size`` of the rows added, in bounded memory: every row
    gets a random key and the rows of the ``size`` smallest keys are kept (a bottom-k sample)."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.rng = size, np.random.default_rng(seed)
        self.keys: list[np.ndarray] = []
        self.columns: dict[str, list[np.ndarray]] = {}
        self.buffered = 0

    def add(self, **columns: np.ndarray) -> None:
        count = len(next(iter(columns.values())))
        self.keys.append(self.rng.random(count))
        for name, values in columns.items():
            self.columns.setdefault(name, []).append(values)
        self.buffered += count
        if self.buffered > 2 * self.size:
            self.shrink()

    def shrink(self) -> None:
        keys = np.concatenate(self.keys) if self.keys else np.empty(0)
        keep = np.argpartition(keys, self.size)[:self.size] if len(keys) > self.size else np.arange(len(keys))
        self.keys = [keys[keep]]
        self.columns = {name: [np.concatenate(parts)[keep]] for name, parts in self.columns.items()}
        self.buffered = len(keep)

    def sample(self) -> dict[str, np.ndarray]:
        self.shrink()
        return {name: parts[0] for name, parts in self.columns.items()}


@dataclass
class TrafficSummary:
    """One version's served traffic as drift needs it: every request counted (images and predicted
    classes exactly), the per-image statistics and confidences of a uniform sample of at most
    DRIFT_SAMPLE images. Neither the images nor anything per request beyond the sample is kept."""

    count: int = 0
    class_counts: np.ndarray = field(default_factory=lambda: np.zeros(10, np.int64))
    reservoir: Reservoir = field(default_factory=lambda: Reservoir(DRIFT_SAMPLE))
    pending: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    pending_images: int = 0

    def add(self, images: np.ndarray, probabilities: np.ndarray) -> None:
        self.pending.append((images, probabilities))
        self.pending_images += len(probabilities)
        if self.pending_images >= FLUSH:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        images = np.concatenate([i for i, _ in self.pending])
        probabilities = np.concatenate([p for _, p in self.pending])
        self.pending, self.pending_images = [], 0
        features = ink_statistics(to_uint8(images))
        self.count += len(probabilities)
        self.class_counts += np.bincount(probabilities.argmax(axis=1), minlength=10)
        self.reservoir.add(confidence=probabilities.max(axis=1),
                           **{name: features[name] for name in INPUT_FEATURES})

    def arrays(self) -> dict[str, np.ndarray]:
        """What the drift tests read: the sample's columns, the class counts and the count."""
        self.flush()
        return {**self.reservoir.sample(), "class_counts": self.class_counts, "count": np.asarray(self.count)}


def summarise(images: np.ndarray, probabilities: np.ndarray) -> dict[str, np.ndarray]:
    """One batch of images and answers as ``TrafficSummary.arrays`` gives them."""
    summary = TrafficSummary()
    summary.add(images, probabilities)
    return summary.arrays()


def served_traffic(records: Iterable[tuple[Any, bytes]], live_checks: FirstLiveChecks) -> dict[int, TrafficSummary]:
    """Logged (entry, record) pairs, in the order they were logged, summarised per version that
    answered, a record at a time. A publish's live check through the gateway is left out (it is not
    traffic the model meets), but only as ``live_checks`` tells it: signed with the key, for the
    version that answered, the first use of its id. Nothing else a caller sends leaves it out."""
    from tasks.digits import logged_digits

    summaries: dict[int, TrafficSummary] = {}
    for entry, record in records:
        if entry.version is None or live_checks.take(entry):
            continue
        digits, probabilities = logged_digits(record)
        if probabilities is None:
            continue
        summaries.setdefault(entry.version, TrafficSummary()).add(digits, probabilities)
    return summaries


REFERENCE_FILE = "assets.extra/reference_stats.json"
REFERENCE_SAMPLE = 2000
INPUT_FEATURES = ("ink_fraction", "intensity", "box_height", "box_width")
MAX_REFERENCE_VALUES = 100_000  # a reference read from the bucket is refused beyond this


class DriftReferenceError(MnistError, ValueError):
    """A version's reference statistics are missing or malformed."""

    status = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class DriftThresholds:
    alpha: float = 0.01  # significance of each test
    min_effect: float = 0.1  # KS statistic or total variation distance that counts as drift
    min_requests: int = 200  # fewer logged images than this: not enough data for a verdict


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float [N,28,28,1] in [0,1] -> uint8 [N,28,28], as batches keep digits."""
    return np.clip(np.round(np.asarray(images).reshape(-1, 28, 28) * 255.0), 0, 255).astype(np.uint8)


def reference_statistics(images: np.ndarray, probabilities: np.ndarray, source: str) -> dict[str, Any]:
    """The reference a version is published with: what its inputs and answers looked like."""
    features = ink_statistics(to_uint8(images))
    return {"source": source, "count": int(len(images)),
            "inputs": {name: np.round(features[name], 5).tolist() for name in INPUT_FEATURES},
            "predicted_class": (np.bincount(probabilities.argmax(axis=1), minlength=10) / len(probabilities)).tolist(),
            "confidence": np.round(probabilities.max(axis=1), 6).tolist()}


def write_reference(saved_model_dir: Path, reference: dict[str, Any]) -> Path:
    path = saved_model_dir / REFERENCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(reference))
    return path


def checked_reference(raw: Any) -> dict[str, Any]:
    """A reference read back (from the bucket), refused unless it has the shape written above."""
    def values(item: Any) -> bool:
        return isinstance(item, list) and 0 < len(item) <= MAX_REFERENCE_VALUES and \
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in item)
    if not (isinstance(raw, dict) and isinstance(raw.get("inputs"), dict)
            and all(values(raw["inputs"].get(name)) for name in INPUT_FEATURES)
            and values(raw.get("confidence")) and values(raw.get("predicted_class"))
            and len(raw["predicted_class"]) == 10):
        raise DriftReferenceError("reference statistics are malformed")
    return raw


def ks_score(reference: list[float], live: np.ndarray, thresholds: DriftThresholds) -> DriftScore:
    from scipy import stats  # a second to import: the export writes references without it

    result = stats.ks_2samp(np.asarray(reference, dtype=np.float64), live)
    statistic, p_value = float(result.statistic), float(result.pvalue)
    return DriftScore(test="kolmogorov-smirnov", statistic=statistic, p_value=p_value,
                      drift=p_value < thresholds.alpha and statistic >= thresholds.min_effect)


def class_score(reference: list[float], class_counts: np.ndarray, thresholds: DriftThresholds) -> DriftScore:
    from scipy import stats

    observed = np.asarray(class_counts, dtype=np.float64)
    expected_share = (np.asarray(reference, dtype=np.float64) + 1e-3) / (np.sum(reference) + 1e-2)
    result = stats.chisquare(observed, expected_share * observed.sum())
    distance = 0.5 * float(np.abs(observed / observed.sum() - np.asarray(reference)).sum())
    return DriftScore(test="chi-square", statistic=distance, chi2=float(result.statistic),
                      p_value=float(result.pvalue),
                      drift=float(result.pvalue) < thresholds.alpha and distance >= thresholds.min_effect)


def compare(reference: dict[str, Any], traffic: dict[str, np.ndarray], thresholds: DriftThresholds) -> DriftVerdict:
    """Scores of a version's summarised traffic (``TrafficSummary.arrays``) against its
    reference; the verdict says ``not enough data`` below ``min_requests`` images."""
    count = int(traffic["count"])
    if count < thresholds.min_requests:
        return DriftVerdict(images=count, verdict="not enough data",
                            reason=f"{count} logged images, fewer than {thresholds.min_requests} needed for a verdict")
    scores = {name: ks_score(reference["inputs"][name], traffic[name], thresholds) for name in INPUT_FEATURES}
    scores["confidence"] = ks_score(reference["confidence"], traffic["confidence"], thresholds)
    scores["predicted_class"] = class_score(reference["predicted_class"], traffic["class_counts"], thresholds)
    drifted = [name for name, score in scores.items() if score.drift]
    return DriftVerdict(images=count, verdict="drift" if drifted else "no drift", drifted=drifted, scores=scores,
                        sampled=int(len(traffic["confidence"])),
                        live_predicted_class=(traffic["class_counts"] / count).tolist())


def plot_drift(reference: dict[str, Any], traffic: dict[str, np.ndarray], path: Path, title: str) -> Path:
    """Reference against live: a histogram per input statistic and the confidence, bars per class."""
    from tasks.report import plt, save_figure

    panels = [(name, reference["inputs"][name], traffic[name]) for name in INPUT_FEATURES]
    panels.append(("confidence", reference["confidence"], traffic["confidence"]))
    figure, axes = plt.subplots(2, 3, figsize=(13, 7))
    for axis, (name, ref, live) in zip(axes.flat, panels):
        edges = np.histogram_bin_edges(np.concatenate([np.asarray(ref), live]), bins=30)
        axis.hist(ref, bins=edges, density=True, alpha=0.5, label="reference")
        axis.hist(live, bins=edges, density=True, alpha=0.5, label="served")
        axis.set_title(name.replace("_", " "))
        axis.legend(fontsize=8)
    classes = np.arange(10)
    live_share = traffic["class_counts"] / max(int(traffic["count"]), 1)
    axes.flat[5].bar(classes - 0.2, reference["predicted_class"], width=0.4, label="reference")
    axes.flat[5].bar(classes + 0.2, live_share, width=0.4, label="served")
    axes.flat[5].set_xticks(classes)
    axes.flat[5].set_title("predicted class")
    axes.flat[5].legend(fontsize=8)
    figure.suptitle(title)
    return save_figure(figure, path)


def drift_markdown(results: dict[int, DriftVerdict], window: str, plots: dict[int, str],
                   notes: list[str]) -> str:
    lines = [f"# Drift of served traffic ({window})", ""]
    for version, result in sorted(results.items()):
        lines += [f"## Version {version}: **{result.verdict}** ({result.images} logged images)", ""]
        if not result.scores:
            lines += [result.reason or "", ""]
            continue
        lines += ["| statistic | test | effect | p-value | drift |", "|---|---|---|---|---|"]
        for name, score in result.scores.items():
            lines.append(f"| {name.replace('_', ' ')} | {score.test} | {score.statistic:.3f} | "
                         f"{score.p_value:.2e} | {'**yes**' if score.drift else 'no'} |")
        lines += ["", f"![drift of version {version}]({plots[version]})", ""] if version in plots else [""]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"
