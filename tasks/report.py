"""Report stage: PNG plots (matplotlib Agg) and the markdown report text."""

from __future__ import annotations

import base64
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # never open a window, even where a display exists

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from storage.models import VersionRow
from tasks.results import (  # noqa: E402
    Candidate,
    Evaluation,
    LiveCheck,
    PublishedVersion,
    RunOutcome,
    StableScores,
    TestScores,
    Verdict,
)


def save_figure(figure: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_training_curves(history: dict[str, list[float]], path: Path) -> Path:
    """The reference's two-panel figure: accuracy and loss per epoch, train and validation."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    epochs = np.arange(1, len(history["loss"]) + 1)
    for axis, metric in zip(axes, ("accuracy", "loss")):
        axis.plot(epochs, history[metric], marker="o", label="train")
        if f"val_{metric}" in history:
            axis.plot(epochs, history[f"val_{metric}"], marker="o", label="validation")
        axis.set_title(f"model {metric}")
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.legend()
        axis.grid(alpha=0.3)
    return save_figure(figure, path)


def plot_confusion_matrix(matrix: list[list[int]], path: Path) -> Path:
    counts = np.asarray(matrix)
    figure, axis = plt.subplots(figsize=(6.5, 5.5))
    image = axis.imshow(np.log1p(counts), cmap="Blues")
    for (row, col), count in np.ndenumerate(counts):
        colour = "white" if count > counts.max() / 2 else "black"
        axis.text(col, row, str(count), ha="center", va="center", fontsize=7, color=colour)
    axis.set_xticks(range(10))
    axis.set_yticks(range(10))
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title("confusion matrix (test set)")
    figure.colorbar(image, ax=axis, label="log(1 + count)")
    return save_figure(figure, path)


def plot_misclassified(images: np.ndarray, true_labels: np.ndarray, predicted: np.ndarray,
                       indices: list[int], path: Path, limit: int = 36) -> Path:
    """A grid of misclassified test digits, each labelled with its index, true and predicted label.
    One mosaic in one axes: a subplot per digit costs a second of a person's wait per run."""
    shown = indices[:limit]
    columns = 9
    rows = max(1, int(np.ceil(len(shown) / columns)))
    cell = 36  # 28 pixels of digit and room for its label above
    mosaic = np.zeros((rows * cell, columns * cell))
    for slot, index in enumerate(shown):
        row, column = divmod(slot, columns)
        mosaic[row * cell + 8:row * cell + 36, column * cell + 4:column * cell + 32] = images[index].squeeze()
    figure, axis = plt.subplots(figsize=(columns * 1.2, rows * 1.4))
    axis.imshow(mosaic, cmap="gray_r", interpolation="nearest")
    axis.axis("off")
    for slot, index in enumerate(shown):
        row, column = divmod(slot, columns)
        axis.text(column * cell + 18, row * cell + 4, f"#{index} true {true_labels[index]} pred {predicted[index]}",
                  ha="center", va="center", fontsize=6)
    figure.suptitle(f"misclassified test digits ({len(indices)} in all, first {len(shown)} shown)")
    return save_figure(figure, path)


def plot_samples(images: np.ndarray, labels: np.ndarray, path: Path, limit: int = 40) -> Path:
    """A grid of the first digits of a batch, titled with their labels."""
    shown = min(limit, len(labels))
    columns = 10
    rows = max(1, int(np.ceil(shown / columns)))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.0, rows * 1.15), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, label in zip(axes.flat, images[:shown], labels[:shown]):
        axis.imshow(image, cmap="gray_r")
        axis.set_title(str(int(label)), fontsize=8)
    figure.suptitle(f"sample digits ({shown} of {len(labels)})")
    return save_figure(figure, path)


def plot_accuracy_trend(rows: list[VersionRow], path: Path) -> Path:
    """Test accuracy per published version: MNIST's test set and each new source's slice."""
    figure, axis = plt.subplots(figsize=(7, 3.2))
    versions = [row.version for row in rows]
    axis.plot(versions, [row.test_accuracy if row.test_accuracy is not None else np.nan for row in rows],
              marker="o", label="MNIST test")
    for source in sorted({name for row in rows for name in row.slices}):
        axis.plot(versions, [row.slices.get(source, np.nan) for row in rows], marker="s", label=source)
    axis.set_xlabel("version")
    axis.set_ylabel("test accuracy")
    axis.set_ylim(*trend_limits([float(value) for line in axis.get_lines()
                                 for value in np.asarray(line.get_ydata(), dtype=np.float64)]))
    axis.yaxis.set_major_formatter(accuracy_tick)
    axis.set_xticks(versions)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title("accuracy per published version")
    return save_figure(figure, path)


def trend_limits(values: list[float]) -> tuple[float, float]:
    """A y range that shows the differences between versions, with room above the highest point:
    a slice at 1.0 on the top edge would show half a marker. Ticks past 1.0 are left unlabelled."""
    known = [float(value) for value in values if value == value]  # NaN: a slice a version lacks
    if not known:
        return 0.0, 1.0
    spread = max(max(known) - min(known), 0.002)
    return max(0.0, min(known) - spread), max(known) + (spread if max(known) + spread <= 1.0 else spread / 4)


def accuracy_tick(value: float, _position: float) -> str:
    """An accuracy axis's tick label; none past 1.0, which only the room above a point at 1.0 reaches."""
    return "" if value > 1.0 + 1e-9 else f"{value:.4g}"


def registry_markdown(rows: list[VersionRow], history: list[dict], scratch: Path) -> str:
    """The registry overview: every version, its labels, data and accuracy, the trend, the last events."""
    sources = sorted({name for row in rows for name in row.slices})
    shown = lambda value: "-" if value is None else f"{value:.4f}"  # noqa: E731
    lines = ["# Model registry", ""]
    serving = {label: row.version for row in rows for label in row.labels}
    lines += [("Serving: " + ", ".join(f"`{label}` -> version {v}" for label, v in sorted(serving.items())))
              if serving else "No label points at a version yet.", ""]
    lines += ["| version | labels | dataset version | MNIST test | " + " | ".join(sources) + (" |" if sources else "")
              + " published |", "|---" * (5 + len(sources)) + "|"]
    for row in reversed(rows):
        cells = [str(row.version), ", ".join(row.labels) or "-", shown_int(row.dataset_version),
                 shown(row.test_accuracy), *[shown(row.slices.get(s)) for s in sources],
                 str(row.published_at)]
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        lines += ["", f"![accuracy per version]({embedded_png(plot_accuracy_trend(rows, scratch / 'trend.png'))})"]
    recent = [e for e in history if e.get("event") in {"published", "rejected", "label", "rollback"}][-10:]
    if recent:
        lines += ["", "Last events:", ""]
        lines += [f"- {e['time']} {e['event']}" + (f" version {e['version']}" if e.get("version") else "")
                  + (f" ({e['label']})" if e.get("label") else "") + (f": {e['reason']}" if e.get("reason") else "")
                  for e in reversed(recent)]
    return "\n".join(lines) + "\n"


def shown_int(value) -> str:
    return "MNIST only" if value is None else str(value)


def metrics_table(metrics: TestScores) -> list[dict[str, object]]:
    """Rows for a Prefect table artifact: overall metrics, then one row per digit."""
    rows: list[dict[str, object]] = [
        {"metric": "test_accuracy", "value": round(metrics.test_accuracy, 5)},
        {"metric": "test_loss", "value": round(metrics.test_loss, 5)},
        {"metric": "misclassified", "value": len(metrics.misclassified)},
    ]
    rows += [{"metric": f"accuracy digit {digit}", "value": round(value, 5)}
             for digit, value in enumerate(metrics.per_class_accuracy)]
    return rows


def verdict_line(published: PublishedVersion | None, live_check: LiveCheck | None) -> str:
    """One line for a run that passed the gate: what happened after it."""
    if live_check and live_check.passed is False:
        return live_check.summary
    if published:
        return f"passed the gate; published version {published.version} as {published.label}"
    return "passed the gate; exported, not published"


def failing_checks_lines(gate: Verdict) -> list[str]:
    """A rejected run's failing checks, first in its report: what failed, by how much."""
    if gate.passed or not gate.failed:
        return []
    lines = ["| failing check | value | limit |", "|---|---|---|"]
    lines += [f"| {check.check} | {check.value:.4f} | {'<=' if check.at_most else '>='} {check.limit:.4f} |"
              for check in gate.failed]
    return lines + [""]


def slice_lines(metrics: Evaluation, stable: StableScores | None) -> list[str]:
    """The table of slices, candidate against stable on the same images, and each slice's confusion matrix."""
    slices = metrics.slices
    if not slices:
        return []
    theirs = stable.slices if stable else {}
    shown = lambda scores: "-" if scores is None else f"{scores.accuracy:.4f}"  # noqa: E731
    lines = ["## Slices", "", "| slice | test examples | candidate | stable |", "|---|---|---|---|",
             f"| MNIST test | {metrics.num_examples} | {metrics.test_accuracy:.4f} | "
             f"{'-' if stable is None else f'{stable.test_accuracy:.4f}'} |"]
    lines += [f"| {name} | {scores.num_examples} | {scores.accuracy:.4f} | {shown(theirs.get(name))} |"
              for name, scores in sorted(slices.items())]
    for name, scores in sorted(slices.items()):
        lines += ["", f"Confusion matrix of slice {name} (rows true, columns predicted):", "",
                  "| | " + " | ".join(str(d) for d in range(10)) + " |", "|---" * 11 + "|"]
        lines += [f"| **{digit}** | " + " | ".join(str(v) for v in row) + " |"
                  for digit, row in enumerate(scores.confusion_matrix)]
    return lines + [""]


def candidate_lines(candidates: tuple[Candidate, ...]) -> list[str]:
    """Every candidate trained, by validation accuracy; the test set scored only the chosen one."""
    if not candidates:
        return []
    lines = ["## Candidates", "", f"{len(candidates)} trained at once on Dask; the best by validation accuracy went "
             "to the gate (the test set chose nothing).", "", "| candidate | seed | validation accuracy | chosen |",
             "|---|---|---|---|"]
    lines += [f"| {index + 1} | {c.seed} | {c.val_accuracy:.4f} | {'**yes**' if c.chosen else ''} |"
              for index, c in enumerate(candidates)]
    return lines + [""]


def embedded_png(path: Path) -> str:
    """A data URI, so the plots show on the Prefect run page without a file server."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def markdown_report(metrics: Evaluation, outcome: RunOutcome, history: dict[str, list[float]],
                    plots: dict[str, Path]) -> str:
    """The run's report: verdict, metrics, comparison with stable, publication, lineage, plots."""
    gate, published, live, stable = outcome.gate, outcome.published, outcome.live_check, outcome.stable
    per_class = " | ".join(f"{value:.4f}" for value in metrics.per_class_accuracy)
    lines = [
        "# MNIST training run",
        "",
        f"**Verdict:** {outcome.verdict}",
        "",
        *failing_checks_lines(gate),
        "| test accuracy | test loss | misclassified | epochs run |",
        "|---|---|---|---|",
        f"| {metrics.test_accuracy:.4f} | {metrics.test_loss:.4f} | "
        f"{len(metrics.misclassified)} / {metrics.num_examples} | {len(history['loss'])} |",
        "",
        "Per-class accuracy (digits 0-9):",
        "",
        "| " + " | ".join(str(d) for d in range(10)) + " |",
        "|" + "---|" * 10,
        f"| {per_class} |",
        "",
        "## Gate",
        "",
        f"{'Passed' if gate.passed else 'Rejected'}. Compared with stable: "
        + (f"version {stable.version} ({stable.test_accuracy:.4f} on this test set)."
           if stable else "no stable version yet; the absolute gate alone decided."),
        "",
        "| check: value vs limit |",
        "|---|",
        *[f"| {check} |" for check in gate.checks],
        *[f"| not checked: {why} |" for why in gate.skipped],
        *[f"\n{note}" for note in outcome.slice_notes],
        *([f"\n**Feedback ingested first:** {outcome.feedback}"] if outcome.feedback else []),
        "",
        *slice_lines(metrics, stable),
        *candidate_lines(outcome.candidates),
        "## Publication",
        "",
        (f"Published **version {published.version}** as `{published.label}`: `{published.uri}` "
         f"(its manifest: `{published.show}`; every version: "
         + (f"[the registry overview]({published.overview})" if published.overview
            else "the `mnist-registry` artifact") + ")" if published else "Not published."),
    ]
    if live:
        lines += ["", f"Live check: {live.summary}"]
    lines += ["", "## Plots", ""]
    for name, path in plots.items():
        lines += [f"### {name}", "", f"![{name}]({embedded_png(path)})", "", f"`{path}`", ""]
    lines += ["## Lineage", ""]
    lines += [f"- **{key}**: {readable(value)}" for key, value in outcome.lineage.model_dump().items()]
    return "\n".join(lines) + "\n"


def readable(value: object) -> str:
    """A lineage value for a person: nested settings as ``name value`` pairs, not a Python dict."""
    if isinstance(value, dict):
        if not value:
            return "none"
        return ", ".join(f"{key} {readable(item)}" if not isinstance(item, dict) else f"{key} ({readable(item)})"
                         for key, item in value.items())
    if value is None:
        return "none"
    return f"`{value}`"


# --- Prefect task -------------------------------------------------------------
import json  # noqa: E402

from prefect import task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402


@task(name="report", timeout_seconds=300)
def report(run_dir: str, prepared_path: str, metrics: Evaluation, outcome: RunOutcome) -> dict[str, str]:
    """Write the PNG plots and report.md; publish them as Prefect artifacts.

    ``outcome`` holds the verdict line, the gate, the stable comparison, the
    publication and live check (when they happened) and the lineage."""
    from tasks.data import load_test_set

    run = Path(run_dir)
    history = json.loads((run / "history.json").read_text())
    x_test, y_test = load_test_set(Path(prepared_path))
    plots = {
        "training curves": plot_training_curves(history, run / "training_curves.png"),
        "confusion matrix": plot_confusion_matrix(metrics.confusion_matrix, run / "confusion_matrix.png"),
        "misclassified digits": plot_misclassified(x_test, y_test, np.asarray(metrics.predictions),
                                                   metrics.misclassified, run / "misclassified.png"),
    }
    text = markdown_report(metrics, outcome, history, plots)
    (run / "report.md").write_text(text)
    create_table_artifact(metrics_table(metrics), key="mnist-metrics", description="Test-set metrics")
    create_markdown_artifact(text, key="mnist-report", description="Training run report")
    return {name: str(path) for name, path in plots.items()} | {"report": str(run / "report.md")}


def outcome_tags(published: PublishedVersion | None, rejected: bool, test_accuracy: float | None,
                 live_check: LiveCheck | None = None) -> list[str]:
    """What a training run's row in the Prefect runs list says at a glance."""
    tags = ["rejected"] if rejected else [f"published:v{published.version}"] if published else ["exported"]
    if live_check and live_check.passed is False:
        tags.append("live-check-failed")
    return tags + ([f"accuracy:{test_accuracy:.4f}"] if test_accuracy is not None else [])


@task(name="tag-run")
def tag_run(tags: list[str]) -> list[str]:
    """Add the outcome to the flow run's tags, so the runs list shows it without opening the run."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    with get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run.id).tags
        client.update_flow_run(flow_run.id, tags=[*current, *(tag for tag in tags if tag not in current)])
    return tags
