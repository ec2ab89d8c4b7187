"""The ingest flow: new labelled digits -> validated batch -> dataset version, with its report
(a sample grid and the label histogram) in the Prefect UI and the ``mnist.data.added`` event
that the retrain-on-new-data automation listens for. Wiring only: the work is ``tasks.ingest``."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from prefect.states import Failed, State

from storage.settings import PipelineSettings
from tasks.results import BatchAdded, Ingested


def data_added_event(result: Ingested, source: str) -> None:
    """``mnist.data.added`` with count, source and dataset version, on the dataset's resource."""
    batch, version = result.batch, result.version
    emit_event("mnist.data.added", resource={"prefect.resource.id": "mnist.dataset.mnist",
                                             "prefect.resource.name": "mnist dataset"},
               payload={"count": batch["count"], "source": source, "dataset_version": version["version"],
                        "batch": batch["sha256"], "examples": version["examples"]})


@task(name="ingest-report")
def ingest_report(result: Ingested, source_path: str) -> str:
    """A markdown artifact: counts, warnings, the label histogram and a grid of sample digits."""
    import tempfile

    from storage.datasets import DatasetStore
    from storage.settings import DatasetSettings
    from tasks.report import embedded_png, plot_samples

    batch, version = result.batch, result.version
    examples = DatasetStore(DatasetSettings()).read_batch(batch["sha256"])
    with tempfile.TemporaryDirectory() as scratch:
        grid = embedded_png(plot_samples(examples.images, examples.labels, Path(scratch) / "samples.png"))
    histogram = " | ".join(str(count) for count in batch["label_histogram"])
    warnings = "\n".join(f"- {w}" for w in result.report.warnings) or "- none"
    text = (f"# Ingested {batch['count']} digits from `{batch['source']}`\n\n"
            f"Batch `{batch['sha256'][:12]}` from `{source_path}` is in dataset version "
            f"**{version['version']}** ({version['examples']} new examples in all).\n\n"
            f"| split | train | validation | test |\n|---|---|---|---|\n| examples | "
            f"{batch['split_counts']['train']} | {batch['split_counts']['validation']} | "
            f"{batch['split_counts']['test']} |\n\n"
            "| " + " | ".join(str(d) for d in range(10)) + " |\n|" + "---|" * 10 + f"\n| {histogram} |\n\n"
            f"Warnings:\n{warnings}\n\n![samples]({grid})\n")
    create_markdown_artifact(text, key="mnist-ingest", description="Ingested batch")
    return text


@task(name="ingest-feedback", timeout_seconds=1800)
def feedback_batch(data_dir: str | None) -> str:
    """The feedback collected since the last time, as a dataset batch; the one-line outcome."""
    from storage.datasets import DatasetStore
    from storage.logs import FeedbackStore, PredictionLogStore
    from storage.models import ModelStore
    from storage.settings import DatasetSettings, StoreSettings, TrafficSettings
    from tasks.data import load_mnist
    from tasks.feedback import ingest_feedback
    from tasks.ingest import mnist_reference
    from tasks.screen import trusted_screen

    train, test, _ = load_mnist(Path(data_dir) if data_dir else PipelineSettings().data_dir)
    traffic = TrafficSettings()
    with trusted_screen(ModelStore(StoreSettings()), test.images, test.labels) as calibrations:
        result = ingest_feedback(DatasetStore(DatasetSettings()), PredictionLogStore(traffic), FeedbackStore(traffic),
                                 mnist_reference(train.images, test.images, test.labels), screen_with=calibrations)
    if result is None:
        outcome = "no new feedback to learn from"
    elif result.feedback_items == 0:
        outcome = "no feedback accepted yet"
    elif result.ingested is None:
        outcome = f"{result.feedback_items} feedback labels, all on images already known"
    else:
        outcome = (f"{result.ingested.batch['count']} feedback examples ({result.corrections} corrections) "
                   f"added as dataset version {result.ingested.version['version']}")
    if result is not None:
        policy = result.policy
        outcome += (f"; {policy.screened_out} held by the data screen (mnist data quarantine)"
                    if policy.screened_out else "")
        outcome += (f"; {policy.trusted} trusted and {policy.agreed} agreed label(s) taken, "
                    f"{policy.quarantined} in quarantine, {policy.capped} held back by the per-caller cap, "
                    f"{policy.over_budget} by the window budgets")
    get_run_logger().info(outcome)
    return outcome


@flow(name="mnist-data-ingest", log_prints=True)
def ingest_flow(source_path: str, source: str) -> BatchAdded | State:
    """Ingest a folder of 0-9 sub-folders, a CSV of path,label or an .npz as source ``source``."""
    from storage.datasets import DatasetStore
    from storage.settings import DatasetSettings
    from tasks.data import load_mnist_idx
    from tasks.ingest import IngestError, ingest, mnist_reference

    data_dir = PipelineSettings().data_dir
    if data_dir is None:
        return Failed(message="set MNIST_DATA_DIR: new digits are checked against MNIST's")
    train, test, _ = load_mnist_idx(data_dir)
    try:
        result = ingest(DatasetStore(DatasetSettings()), Path(source_path), source,
                        mnist_reference(train.images, test.images, test.labels))
    except IngestError as error:
        return Failed(message=str(error))
    ingest_report(result, source_path)
    data_added_event(result, source)
    return BatchAdded(batch=result.batch["sha256"], dataset_version=result.version["version"],
                      count=result.batch["count"], warnings=result.report.warnings)
