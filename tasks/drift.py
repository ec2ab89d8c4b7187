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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from tasks.digits import ink_statistics


def served_traffic(records: Iterable[tuple[Any, bytes]]
                   ) -> tuple[dict[int, list[np.ndarray]], dict[int, list[np.ndarray]]]:
    """Logged (entry, record) pairs as the images and answers of each version that answered; a
    publish's live check through the gateway is left out: it is not traffic the model meets."""
    from tasks.feedback import logged_digits

    images: dict[int, list[np.ndarray]] = {}
    answers: dict[int, list[np.ndarray]] = {}
    for entry, record in records:
        if entry.is_live_check or entry.version is None:
            continue
        digits, probabilities = logged_digits(record)
        if probabilities is None:
            continue
        images.setdefault(entry.version, []).append(digits)
        answers.setdefault(entry.version, []).append(probabilities)
    return images, answers


REFERENCE_FILE = "assets.extra/reference_stats.json"
REFERENCE_SAMPLE = 2000
INPUT_FEATURES = ("ink_fraction", "intensity", "box_height", "box_width")
MAX_REFERENCE_VALUES = 100_000  # a reference read from the bucket is refused beyond this


class ReferenceError(ValueError):
    """A version's reference statistics are missing or malformed."""


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
        raise ReferenceError("reference statistics are malformed")
    return raw


def ks_score(reference: list[float], live: np.ndarray, thresholds: DriftThresholds) -> dict[str, Any]:
    from scipy import stats  # a second to import: the export writes references without it

    result = stats.ks_2samp(np.asarray(reference, dtype=np.float64), live)
    statistic, p_value = float(result.statistic), float(result.pvalue)
    return {"test": "kolmogorov-smirnov", "statistic": statistic, "p_value": p_value,
            "drift": p_value < thresholds.alpha and statistic >= thresholds.min_effect}


def class_score(reference: list[float], predicted: np.ndarray, thresholds: DriftThresholds) -> dict[str, Any]:
    from scipy import stats

    observed = np.bincount(predicted, minlength=10).astype(np.float64)
    expected_share = (np.asarray(reference, dtype=np.float64) + 1e-3) / (np.sum(reference) + 1e-2)
    result = stats.chisquare(observed, expected_share * observed.sum())
    distance = 0.5 * float(np.abs(observed / observed.sum() - np.asarray(reference)).sum())
    return {"test": "chi-square", "statistic": distance, "chi2": float(result.statistic),
            "p_value": float(result.pvalue), "drift": float(result.pvalue) < thresholds.alpha
            and distance >= thresholds.min_effect}


def compare(reference: dict[str, Any], images: np.ndarray, probabilities: np.ndarray,
            thresholds: DriftThresholds) -> dict[str, Any]:
    """Scores of the live ``images`` (float [N,28,28,1]) and ``probabilities`` [N,10] against a
    version's reference; the verdict says ``not enough data`` below ``min_requests`` images."""
    count = int(len(images))
    if count < thresholds.min_requests:
        return {"images": count, "verdict": "not enough data", "drifted": [], "scores": {},
                "reason": f"{count} logged images, fewer than {thresholds.min_requests} needed for a verdict"}
    features = ink_statistics(to_uint8(images))
    scores = {name: ks_score(reference["inputs"][name], features[name], thresholds) for name in INPUT_FEATURES}
    scores["confidence"] = ks_score(reference["confidence"], probabilities.max(axis=1), thresholds)
    scores["predicted_class"] = class_score(reference["predicted_class"], probabilities.argmax(axis=1), thresholds)
    drifted = [name for name, score in scores.items() if score["drift"]]
    return {"images": count, "verdict": "drift" if drifted else "no drift", "drifted": drifted, "scores": scores,
            "live_predicted_class": (np.bincount(probabilities.argmax(axis=1), minlength=10) / count).tolist()}


def plot_drift(reference: dict[str, Any], images: np.ndarray, probabilities: np.ndarray, path: Path,
               title: str) -> Path:
    """Reference against live: a histogram per input statistic and the confidence, bars per class."""
    from tasks.report import plt, save_figure

    features = ink_statistics(to_uint8(images))
    panels = [(name, reference["inputs"][name], features[name]) for name in INPUT_FEATURES]
    panels.append(("confidence", reference["confidence"], probabilities.max(axis=1)))
    figure, axes = plt.subplots(2, 3, figsize=(13, 7))
    for axis, (name, ref, live) in zip(axes.flat, panels):
        edges = np.histogram_bin_edges(np.concatenate([np.asarray(ref), live]), bins=30)
        axis.hist(ref, bins=edges, density=True, alpha=0.5, label="reference")
        axis.hist(live, bins=edges, density=True, alpha=0.5, label="served")
        axis.set_title(name.replace("_", " "))
        axis.legend(fontsize=8)
    classes = np.arange(10)
    live_share = np.bincount(probabilities.argmax(axis=1), minlength=10) / max(len(probabilities), 1)
    axes.flat[5].bar(classes - 0.2, reference["predicted_class"], width=0.4, label="reference")
    axes.flat[5].bar(classes + 0.2, live_share, width=0.4, label="served")
    axes.flat[5].set_xticks(classes)
    axes.flat[5].set_title("predicted class")
    axes.flat[5].legend(fontsize=8)
    figure.suptitle(title)
    return save_figure(figure, path)


def drift_markdown(results: dict[int, dict[str, Any]], window: str, plots: dict[int, str],
                   notes: list[str]) -> str:
    lines = [f"# Drift of served traffic ({window})", ""]
    for version, result in sorted(results.items()):
        lines += [f"## Version {version}: **{result['verdict']}** ({result['images']} logged images)", ""]
        if not result["scores"]:
            lines += [result["reason"], ""]
            continue
        lines += ["| statistic | test | effect | p-value | drift |", "|---|---|---|---|---|"]
        for name, score in result["scores"].items():
            lines.append(f"| {name.replace('_', ' ')} | {score['test']} | {score['statistic']:.3f} | "
                         f"{score['p_value']:.2e} | {'**yes**' if score['drift'] else 'no'} |")
        lines += ["", f"![drift of version {version}]({plots[version]})", ""] if version in plots else [""]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"
