"""Screen stage: every labelled example from outside MNIST is checked against what the trusted
models already know before it may train, by methods that need no knowledge of an attack.

Whoever can put labelled images into training (a new source, a feedback token, several colluding
tokens) can plant a backdoor or flip labels. Both need labels that contradict the image: digits of
other classes relabelled to a target. The trusted models (``stable``, and the newest version
trained on MNIST alone when that is another one) have never seen these examples, so their answers
are out-of-sample judgements of each given label, whatever trigger the image carries:

- **Confident learning** (Northcutt et al., JAIR 2021; ``cleanlab``): each example's label quality
  (cleanlab's normalized margin: the given label's probability against the strongest other class)
  under each trusted model. The cut is calibrated on trusted digits: an example is flagged when its
  label is less plausible than all but the lowest ``TRUSTED_QUANTILE`` of MNIST's test digits under
  the same model. A new style a model merely finds hard (low confidence everywhere) is not flagged;
  a label the model confidently contradicts is.
- **Activation clustering** (Chen et al., SafeAI 2019): per given label, the examples' hidden-layer
  activations (the ``features`` signature) projected on their top principal components and split in
  two (k-means). A small, well-separated cluster is a sub-population the label does not explain:
  flagged. Honest groups split evenly and loosely (silhouette about 0.3-0.45 measured, MNIST's own
  and a new scanner's); a poisoned minority splits off sharply.
- **The batch as a whole**: when one label's examples are flagged far more often than trusted data
  ever is, the source itself is suspect, and what was not flagged in it may be the rest of the same
  attack. The whole batch then waits.

Flagged examples are never dropped: they wait in quarantine with their reason, for an operator to
accept or reject (``mnist data quarantine``). cleanlab and scikit-learn are used, not re-implemented;
IBM's ART implements activation clustering on the same scikit-learn pieces, but needs the model
wrapped in its own classifier API, which a TF Serving SavedModel is not.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from storage.errors import MnistError

Predictor = Callable[[np.ndarray], np.ndarray]

TRUSTED_QUANTILE = 0.002   # flag labels less plausible than all but 0.2% of trusted test digits
CLUSTER_MIN_GROUP = 30     # examples of one label needed to look for a separate cluster
CLUSTER_MAX_SHARE = 0.35   # a cluster this small or smaller (Chen et al.'s relative size) ...
CLUSTER_MIN_SILHOUETTE = 0.55  # ... and this well separated is flagged (honest groups: <= 0.45)
CLUSTER_COMPONENTS = 3
HOLD_MIN_FLAGGED = 10      # the whole batch waits when one label has this many flagged ...
HOLD_SHARE = 0.10          # ... and more than this share of its examples flagged (honest: ~0.5%)
NO_TRUSTED_MODEL = ("no trusted model to screen against yet: publish one trained on MNIST (mnist train), "
                    "then mnist data screen")
CHUNK = 4096               # examples predicted at once: memory stays flat however large a batch


@dataclass(frozen=True)
class ScreeningModel:
    """A trusted model: its name as people read it, and its answers (and activations) for images."""

    name: str
    predict: Predictor
    features: Predictor | None = None


@dataclass
class Screened:
    """Per example, why it waits (None: it may train); ``held``: why the whole batch waits."""

    reasons: list[str | None]
    held: str | None = None
    checked_with: list[str] = field(default_factory=list)

    @property
    def waiting(self) -> np.ndarray:
        """Indices of the examples that wait in quarantine."""
        if self.held:
            return np.arange(len(self.reasons))
        return np.array([i for i, reason in enumerate(self.reasons) if reason], dtype=np.int64)

    @property
    def flagged(self) -> int:
        return sum(reason is not None for reason in self.reasons)


def as_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N,28,28] as stored -> float [N,28,28,1] in [0,1], the model's input."""
    return (np.asarray(images, dtype=np.float32) / 255.0)[..., None]


def in_chunks(function: Predictor, images: np.ndarray) -> np.ndarray:
    return np.concatenate([function(as_input(images[start:start + CHUNK]))
                           for start in range(0, len(images), CHUNK)]) if len(images) else np.zeros((0, 10))


def label_quality(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    from cleanlab.rank import get_label_quality_scores

    return get_label_quality_scores(np.asarray(labels, dtype=np.int64), probabilities, method="normalized_margin")


@dataclass(frozen=True)
class Calibration:
    """A trusted model's cut: label quality below it is rarer than TRUSTED_QUANTILE on trusted digits."""

    model: ScreeningModel
    cut: float


def calibrate(model: ScreeningModel, trusted_images: np.ndarray, trusted_labels: np.ndarray) -> Calibration:
    scores = label_quality(trusted_labels, in_chunks(model.predict, trusted_images))
    return Calibration(model, float(np.quantile(scores, TRUSTED_QUANTILE)))


def disagreements(calibration: Calibration, images: np.ndarray, labels: np.ndarray) -> list[str | None]:
    """Confident learning's verdict per example under one trusted model."""
    probabilities = in_chunks(calibration.model.predict, images)
    scores = label_quality(labels, probabilities)
    answers = probabilities.argmax(axis=1)
    return [f"{calibration.model.name} answers {answer} ({probabilities[i, answer]:.2f}), not the given "
            f"{labels[i]} (label quality {score:.3f} < {calibration.cut:.3f}, the lowest "
            f"{TRUSTED_QUANTILE:.1%} of MNIST test digits)" if score < calibration.cut else None
            for i, (answer, score) in enumerate(zip(answers, scores))]


def separate_cluster(activations: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Activation clustering of one label's examples: (mask of the smaller cluster, its share,
    the split's silhouette)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    centred = activations - activations.mean(axis=0)
    _, _, directions = np.linalg.svd(centred[:20_000], full_matrices=False)
    projected = centred @ directions[:CLUSTER_COMPONENTS].T
    clusters = KMeans(2, n_init=3, random_state=0).fit_predict(projected)
    sizes = np.bincount(clusters, minlength=2)
    if sizes.min() == 0:
        return np.zeros(len(clusters), dtype=bool), 0.0, 0.0
    silhouette = float(silhouette_score(projected, clusters, sample_size=min(len(clusters), 3000), random_state=0))
    smaller = int(sizes.argmin())
    return clusters == smaller, float(sizes[smaller] / len(clusters)), silhouette


def cluster_outliers(model: ScreeningModel, images: np.ndarray, labels: np.ndarray) -> list[str | None]:
    reasons: list[str | None] = [None] * len(labels)
    if model.features is None:
        return reasons
    activations = in_chunks(model.features, images)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < CLUSTER_MIN_GROUP:
            continue
        smaller, share, silhouette = separate_cluster(activations[members])
        if share <= CLUSTER_MAX_SHARE and silhouette >= CLUSTER_MIN_SILHOUETTE:
            for index in members[smaller]:
                reasons[index] = (f"a separate cluster in {model.name}'s activations: {int(smaller.sum())} of "
                                  f"{len(members)} examples labelled {label} (silhouette {silhouette:.2f} >= "
                                  f"{CLUSTER_MIN_SILHOUETTE})")
    return reasons


def held_batch(reasons: list[str | None], labels: np.ndarray) -> str | None:
    """Why the batch as a whole waits: one label's examples flagged far beyond trusted rates."""
    flagged = Counter(int(label) for label, reason in zip(labels, reasons) if reason)
    totals = Counter(int(label) for label in labels)
    for label, count in flagged.most_common():
        if count >= HOLD_MIN_FLAGGED and count > HOLD_SHARE * totals[label]:
            return (f"{count} of {totals[label]} examples labelled {label} ({count / totals[label]:.0%}) contradict "
                    f"the trusted models: the whole batch waits for an operator")
    return None


def screen(images: np.ndarray, labels: np.ndarray, calibrations: list[Calibration]) -> Screened:
    """Every example of a batch (uint8 [N,28,28], labels [N]) against every trusted model."""
    labels = np.asarray(labels, dtype=np.int64)
    reasons: list[str | None] = [None] * len(labels)
    if not calibrations:
        return Screened(reasons, NO_TRUSTED_MODEL)
    for calibration in calibrations:
        for found in (disagreements(calibration, images, labels),
                      cluster_outliers(calibration.model, images, labels)):
            reasons = [mine or theirs for mine, theirs in zip(reasons, found)]
    return Screened(reasons, held_batch(reasons, labels), [c.model.name for c in calibrations])


# --- the trusted models, from the model store ------------------------------------------
class NoTrustedModel(MnistError, RuntimeError):
    """Nothing to screen against: no version is published yet."""

    status = "FAILED_PRECONDITION"


def trusted_versions(store) -> list[tuple[str, int]]:
    """``stable``, and the newest version trained on MNIST alone when that is another one: a
    stable that learned from admitted data is not the only judge of more of it."""
    versions: list[tuple[str, int]] = []
    stable = store.labels().get("stable")
    if stable is not None:
        versions.append((f"stable v{stable}", stable))
    for version in reversed(store.complete_versions()):
        manifest = store.manifest(version)
        if isinstance(manifest, dict) and "dataset" in manifest and manifest["dataset"] is None:
            if version != stable:
                versions.append((f"MNIST-only v{version}", version))
            break
    return versions


def load_calibrations(store, scratch, trusted_images: np.ndarray, trusted_labels: np.ndarray) -> list[Calibration]:
    """Each trusted version downloaded (verified) into ``scratch``, loaded and calibrated on the
    trusted digits. Raises NoTrustedModel when the store has none."""
    from pathlib import Path

    from tasks.export import saved_model_callables

    versions = trusted_versions(store)
    if not versions:
        raise NoTrustedModel(f"no model in {store.uri()} to screen new examples against yet: train one on "
                             "MNIST first (mnist train)")
    calibrations = []
    for name, version in versions:
        folder = Path(scratch) / str(version)
        store.download(version, folder)
        predict, features = saved_model_callables(folder)
        calibrations.append(calibrate(ScreeningModel(name, predict, features), trusted_images, trusted_labels))
    return calibrations


@contextmanager
def trusted_screen(store, trusted_images: np.ndarray, trusted_labels: np.ndarray) -> Iterator[list[Calibration]]:
    """The trusted models of ``store`` (a ModelStore), calibrated, for the time of a ``with``;
    an empty list when none is published yet (the screen then holds everything)."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            calibrations = load_calibrations(store, scratch, trusted_images, trusted_labels)
        except NoTrustedModel:
            calibrations = []
        yield calibrations
