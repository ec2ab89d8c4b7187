"""What the flows' stages hand each other: small frozen records, not dicts, so that the flows, the
report, the CLI and the chain read fields a reader and a type checker can follow, and a misspelt
name fails where it is written rather than as a missing key three stages later.

Pydantic, as the flow's parameters are: Prefect passes the records between tasks, Dask workers
and subflows as they are, and ``model_dump(mode="json")`` is the JSON a run writes
(``evaluation.json``, a manifest's lineage, ``mnist train --json``). No TensorFlow here: the CLI
reads these without importing it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class StageRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- prepare-data --------------------------------------------------------------------------
class DatasetUsed(StageRecord):
    """The dataset version a run trains on beside MNIST: its number, content and sources' split counts."""

    version: int
    fingerprint: str
    examples: int
    sources: dict[str, dict[str, int]]

    @property
    def test_examples(self) -> int:
        return sum(counts["test"] for counts in self.sources.values())


class TrainingData(StageRecord):
    """Prepared MNIST arrays (``path``, an .npz) or, with a dataset version, the plan that streams it."""

    path: str
    fingerprint: str
    dataset: DatasetUsed | None = None


# --- train -----------------------------------------------------------------------------------
class Candidate(StageRecord):
    """One of several candidates trained at once: its seed and validation accuracy."""

    seed: int
    val_accuracy: float
    chosen: bool


class TrainedModel(StageRecord):
    """A fitted model saved in the run folder; ``candidates``: every one trained when there were several."""

    model_path: str
    history_path: str
    seed: int
    val_accuracy: float | None
    candidates: tuple[Candidate, ...] = ()


# --- evaluate ----------------------------------------------------------------------------------
class SliceScores(StageRecord):
    """A model on one labelled set: size, accuracy, per-digit accuracy, confusion matrix (rows true)."""

    num_examples: int
    accuracy: float
    per_class_accuracy: list[float]
    confusion_matrix: list[list[int]]


def slice_accuracies(slices: dict[str, SliceScores]) -> dict[str, float]:
    """Each slice's accuracy alone: what a manifest, the CLI and the run's result keep of it."""
    return {source: scores.accuracy for source, scores in slices.items()}


class TestScores(StageRecord):
    """A model on MNIST's test set; ``predictions`` and ``misclassified`` by test-set index."""

    __test__ = False  # a record, not a pytest class

    test_loss: float
    test_accuracy: float
    per_class_accuracy: list[float]
    confusion_matrix: list[list[int]]
    misclassified: list[int]
    predictions: list[int]
    num_examples: int


class Evaluation(TestScores):
    """The candidate: the test set, each new source's test slice and the backdoor inspection
    (``tasks/backdoor.py``): per digit, the share of other trusted digits its reverse-engineered
    shortcut sends there, and where those shortcuts are saved for stable to be tried on."""

    shortcuts: list[float]
    shortcut_sizes: list[float]  # pixels each digit's shortcut changes (the mask's L1 norm)
    triggers_path: str
    slices: dict[str, SliceScores]
    evaluation_seconds: float


class StableScores(StageRecord):
    """The version labelled ``stable``, scored on this run's test set and slices (like for like)."""

    version: int
    test_accuracy: float
    per_class_accuracy: list[float]
    misclassified: list[int]
    shortcuts_followed: list[float]  # per digit, the candidate's shortcut tried on stable (Evaluation.shortcuts)
    slices: dict[str, SliceScores]


# --- gate ------------------------------------------------------------------------------------
class FailedCheck(StageRecord):
    check: str
    value: float
    limit: float
    at_most: bool


class Verdict(StageRecord):
    """The gate's judgement: every check described, the failing ones with their figures, and
    ``reason``, the short line a state message and the runs list show."""

    passed: bool
    summary: str
    reason: str
    checks: list[str]
    skipped: list[str] = []  # what was not checked, and why (the first version has no stable)
    failed: list[FailedCheck]


# --- lineage, export, publish, live check ----------------------------------------------------
class Lineage(StageRecord):
    """Where a model came from: written into its manifest, compared to skip an unchanged retrain."""

    flow_run_id: str | None
    flow_run_name: str | None
    data_fingerprint: str
    dataset: DatasetUsed | None
    code_version: str
    library_versions: dict[str, str]
    preset: str
    config: dict[str, Any]
    new_data_weight: int

    def as_manifest(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ExportedModel(StageRecord):
    path: str
    version: int


class PublishedVersion(StageRecord):
    """A version in the model store and the label it got; ``show``: the command that reads its manifest;
    ``overview``: the registry page in the Prefect UI, when the API has one."""

    version: int
    uri: str
    label: str
    show: str
    overview: str | None = None


class LiveCheck(StageRecord):
    """The published version's answers over gRPC against the SavedModel's; ``passed`` None: not run."""

    passed: bool | None
    summary: str


# --- what a run ends with --------------------------------------------------------------------
class RunOutcome(StageRecord):
    """What the report says beside the metrics: the verdict line, the gate, the comparison with
    stable, and what followed a pass (publication, live check)."""

    verdict: str
    gate: Verdict
    stable: StableScores | None
    lineage: Lineage
    slice_notes: list[str] = []
    candidates: tuple[Candidate, ...] = ()
    feedback: str | None = None
    published: PublishedVersion | None = None
    live_check: LiveCheck | None = None


class LabelMoved(StageRecord):
    """A rollback: ``label`` moved from version ``previous`` back to ``current``."""

    label: str
    previous: int
    current: int


class StableSummary(StageRecord):
    version: int
    test_accuracy: float


class TrainingResult(StageRecord):
    """A training run that passed the gate: what ``mnist train`` prints and the chain serves."""

    run_dir: str
    test_accuracy: float
    gate: list[str]
    slices: dict[str, float]
    stable_slices: dict[str, float]
    stable: StableSummary | None
    saved_model: str
    version: int
    published: PublishedVersion | None
    outputs: dict[str, str]


class SkippedRun(StageRecord):
    """A scheduled run that had nothing new to learn from; ``skipped``: why, and how to force it."""

    skipped: str
    run_dir: str


# --- drift ------------------------------------------------------------------------------------
class DriftScore(StageRecord):
    """One statistic of served traffic against the reference: the test, its effect size
    (``statistic``: KS distance, or half the L1 distance of class shares) and p-value."""

    test: Literal["kolmogorov-smirnov", "chi-square"]
    statistic: float
    p_value: float
    drift: bool
    chi2: float | None = None


class DriftVerdict(StageRecord):
    """A version's logged traffic against its reference; ``reason`` when there was too little for a verdict."""

    images: int
    verdict: Literal["drift", "no drift", "not enough data"]
    drifted: list[str] = []
    scores: dict[str, DriftScore] = {}
    reason: str | None = None
    sampled: int | None = None
    live_predicted_class: list[float] | None = None


class DriftRun(StageRecord):
    """What the drift flow found: a verdict per version that answered, notes, and where its report is."""

    results: dict[int, DriftVerdict]
    notes: list[str]
    report_dir: str


# --- ingest -----------------------------------------------------------------------------------
class ValidationReport(StageRecord):
    """A batch's checks: ``errors`` refuse it (nothing is written), ``warnings`` are kept with it."""

    examples: int
    errors: list[str]
    warnings: list[str]
    label_histogram: list[int]


class Ingested(StageRecord):
    """A batch stored and versioned. ``batch`` and ``version``: its manifest and the dataset
    version's, as the store keeps them (store documents stay JSON, checked when read);
    ``skipped``: exact duplicates left out; ``packed``: packs it completed."""

    batch: dict[str, Any]
    version: dict[str, Any]
    report: ValidationReport
    skipped: list[str] = []
    packed: list[str] = []
    quarantine: dict[str, Any] | None = None  # the held examples' manifest: what the screen flagged


class PolicySummary(StageRecord):
    """Pending feedback sorted by the quarantine: labels taken (``trusted``, ``agreed``), images still
    waiting (``quarantined``), agreed labels held back by the per-batch share (``capped``) and by
    the window budgets (``over_budget``), and takes per caller."""

    trusted: int
    agreed: int
    quarantined: int
    capped: int
    over_budget: int = 0
    screened_out: int = 0  # taken by the policy, then held by the data screen (mnist data quarantine)
    callers: dict[str, int]


class FeedbackIngested(StageRecord):
    """Feedback's labels as a batch (``ingested``; None when no label was taken or every image was
    a known one): ``feedback_items`` taken, of which ``corrections`` differ from the served
    answer; ``problems``: items refused one by one."""

    ingested: Ingested | None
    feedback_items: int
    corrections: int
    problems: list[str]
    policy: PolicySummary

    def as_json(self) -> dict[str, Any]:
        """One flat document: the batch's fields beside the feedback's, as ``mnist data add --json`` prints."""
        return {**(self.ingested.model_dump(mode="json") if self.ingested else {}),
                **self.model_dump(mode="json", exclude={"ingested"})}


class BatchAdded(StageRecord):
    """The ingest flow's result: the batch's digest, the dataset version it made, its size and warnings."""

    batch: str
    dataset_version: int
    count: int
    warnings: list[str]
