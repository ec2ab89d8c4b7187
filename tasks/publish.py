"""Publish stage: push a gated SavedModel to the S3 model store and label it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.events import emit_event

from storage.live_check import LiveCheckKey, key_note, live_check_key
from storage.models import ModelStore, NothingToRollBack
from storage.settings import StoreSettings, TrafficSettings
from tasks.results import Evaluation, LabelMoved, Lineage, LiveCheck, PublishedVersion, slice_accuracies

METRIC_KEYS = ("test_accuracy", "test_loss", "per_class_accuracy")


def metric_summary(metrics: Evaluation) -> dict[str, Any]:
    """The metrics a manifest, an event or the history keeps (not the confusion matrix):
    with each new source's slice accuracy."""
    slices = slice_accuracies(metrics.slices)
    return {key: getattr(metrics, key) for key in METRIC_KEYS} | ({"slices": slices} if slices else {})


def run_of(lineage: dict[str, Any]) -> dict[str, Any]:
    """The flow run behind an event, by id and by the name the Prefect UI shows."""
    return {key: lineage.get(key) for key in ("flow_run_id", "flow_run_name")}


def current_run() -> dict[str, Any]:
    from prefect.runtime import flow_run

    return {"flow_run_id": str(flow_run.id) if flow_run.id else None, "flow_run_name": flow_run.name}


def publish_model(store: ModelStore, saved_model: Path, metrics: dict[str, Any], lineage: dict[str, Any],
                  label: str) -> PublishedVersion:
    """Publish, record and label a version. ``metrics`` and ``lineage`` as its manifest keeps them
    (JSON: ``metric_summary`` and ``Lineage.as_manifest`` for a training run's; never credentials)."""
    from storage.settings import SigningSettings

    manifest = store.publish(saved_model, {"metrics": metrics, **lineage}, SigningSettings().signing_key)
    store.record({"event": "published", "version": manifest["version"], **run_of(lineage),
                  "metrics": manifest["metrics"]})
    store.set_label(label, manifest["version"], run_of(lineage))
    return PublishedVersion(version=manifest["version"], uri=manifest["uri"], label=label,
                            show=f"mnist registry show {manifest['version']}")


def ui_link(path: str) -> str | None:
    """A page of the Prefect UI (None when the API has no UI address): links in artifacts point
    there, never at the bucket, whose objects answer 403 when private and nothing when stopped."""
    from prefect.settings import PREFECT_UI_URL

    base = PREFECT_UI_URL.value()
    return f"{base.rstrip('/')}/{path.lstrip('/')}" if base else None


def model_resource(store: ModelStore, version: int | None = None) -> dict[str, str]:
    """The Prefect event resource naming a model (and version) in a store."""
    resource = {"prefect.resource.id": f"mnist.model.{store.settings.model_name}",
                "prefect.resource.name": store.uri()}
    return resource | ({"mnist.version": str(version)} if version is not None else {})


LABELS_VARIABLE = "mnist_labels"  # the Prefect Variable that names the version each label points to


def update_registry_overview(store: ModelStore) -> str | None:
    """Rewrite the ``mnist-registry`` artifact (which version serves, how good, since when, how it
    moved) and the ``mnist_labels`` Variable (label -> version), both visible in the Prefect UI.
    Returns the UI page of the overview just written (None without a UI address)."""
    import tempfile

    from prefect.variables import Variable

    from tasks.report import registry_markdown

    with tempfile.TemporaryDirectory() as scratch:
        text = registry_markdown(store.overview(), store.history(), Path(scratch))
    artifact = create_markdown_artifact(text, key="mnist-registry",
                                        description=f"Model registry overview: {store.uri()}")
    labels = store.labels()
    shown_before: Any = Variable.get(LABELS_VARIABLE, default={})
    Variable.set(LABELS_VARIABLE, {label: version for label, version in sorted(labels.items())},
                 tags=["mnist", "registry"], overwrite=True)
    mark_serving_runs(store, labels, set(shown_before) if isinstance(shown_before, dict) else set())
    return ui_link(f"artifacts/artifact/{artifact}")


SERVING_TAG = "serving:"  # serving:stable on the run that trained the version stable names


def mark_serving_runs(store: ModelStore, labels: dict[str, int], earlier_labels: set[str]) -> None:
    """The runs list says which run's model serves: ``serving:<label>`` on the run that published
    each label's version, and off every run whose version a label left."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.exceptions import ObjectNotFound

    wanted: dict[UUID, set[str]] = {}
    for label, version in labels.items():
        try:  # the manifest is read from the bucket: its run id is checked, not trusted
            run_id = UUID(str(store.manifest(version).get("flow_run_id")))
        except ValueError:
            continue  # pushed from the command line, or not by a run of this server
        wanted.setdefault(run_id, set()).add(SERVING_TAG + label)
    names = sorted({SERVING_TAG + label for label in {*labels, *earlier_labels}})
    with get_client(sync_client=True) as client:
        runs = {run.id: run for run in client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(any_=names)))} if names else {}
        for run_id in wanted.keys() - runs.keys():
            try:
                runs[run_id] = client.read_flow_run(run_id)
            except ObjectNotFound:
                continue  # a version published through another Prefect server
        for run in runs.values():
            tags = [tag for tag in run.tags if not tag.startswith(SERVING_TAG)] + sorted(wanted.get(run.id, ()))
            if tags != run.tags:
                client.update_flow_run(run.id, tags=tags)


# What a retrain must differ in from stable's lineage to be worth its cost.
CHANGE_KEYS = ("data_fingerprint", "code_version", "config")
HOW_TO_FORCE = "force=true retrains anyway (prefect deployment run ... --param force=true, or mnist train --force)"


def same_training(manifest: dict[str, Any], lineage: Lineage) -> bool:
    """Whether a version (its manifest) was trained on this run's data, code and recipe, seed included."""
    ours = lineage.as_manifest()  # compared as the manifest keeps it: JSON
    return all(manifest.get(key) == ours[key] for key in CHANGE_KEYS)


class Skip(NamedTuple):
    """Why a run need not train: one line for the log and report, one tag for the runs list."""

    reason: str
    tag: str


def reason_to_skip(store: ModelStore, lineage: Lineage, min_new_examples: int = 0) -> Skip | None:
    """Why this run need not train, or None: ``stable`` was trained on exactly this data, code and
    recipe, or fewer than ``min_new_examples`` new examples arrived since it was trained."""
    version = store.labels().get("stable")
    if version is None:
        return None
    manifest = store.manifest(version)
    if same_training(manifest, lineage):
        return Skip(f"skipped: nothing changed since version {version} (stable): the same data fingerprint, code "
                    f"version and training config; {HOW_TO_FORCE}", f"unchanged-since-v{version}")
    new = (lineage.dataset.examples if lineage.dataset else 0) - ((manifest.get("dataset") or {}).get("examples") or 0)
    if min_new_examples and new < min_new_examples:
        return Skip(f"skipped: {new} new examples since version {version}, fewer than {min_new_examples} "
                    f"(min_new_examples); {HOW_TO_FORCE}", f"too-few-new-examples:{new}")
    return None


@task(name="read-stable-seed")
def stable_seed() -> int | None:
    """The seed ``stable`` was trained with, which a run that names none trains with: a run on
    unchanged data then compares equal to stable (and skips), and a new seed comes only from a
    forced retrain, which draws one. None without a stable version or a readable seed."""
    store = ModelStore(StoreSettings())
    store.ensure_bucket()
    version = store.labels().get("stable")
    if version is None:
        return None
    config = store.manifest(version).get("config")
    seed = config.get("seed") if isinstance(config, dict) else None  # read from the bucket: checked
    return seed if type(seed) is int and 0 <= seed <= 2**31 - 1 else None


@task(name="check-for-a-repeat")
def forced_repeat(lineage: Lineage) -> int | None:
    """For a forced retrain: the stable version it would reproduce as it stands, or None."""
    store = ModelStore(StoreSettings())
    store.ensure_bucket()
    version = store.labels().get("stable")
    return version if version is not None and same_training(store.manifest(version), lineage) else None


@task(name="check-for-changes")
def check_for_changes(lineage: Lineage, min_new_examples: int = 0) -> Skip | None:
    """None when this run should train; else why it skips (the reason also an artifact)."""
    store = ModelStore(StoreSettings())
    store.ensure_bucket()
    skip = reason_to_skip(store, lineage, min_new_examples)
    if skip is not None:
        get_run_logger().info(skip.reason)
        create_markdown_artifact(f"# Skipped\n\n{skip.reason}\n", key="mnist-report", description="Training run report")
    return skip


@task(name="publish", timeout_seconds=900)
def publish(saved_model: str, metrics: Evaluation, lineage: Lineage, label: str) -> PublishedVersion:
    store = ModelStore(StoreSettings())
    summary = metric_summary(metrics)
    published = publish_model(store, Path(saved_model), summary, lineage.as_manifest(), label)
    published = published.model_copy(update={"overview": update_registry_overview(store)})
    get_run_logger().info("published %s as version %d, labelled %s", published.uri, published.version, label)
    text = f"version {published.version} ({label}), {published.uri}: read it with {published.show}"
    if published.overview:
        create_link_artifact(key="mnist-published-version", link=published.overview, link_text=text,
                             description="Published model version, in the registry overview")
    else:
        create_markdown_artifact(text, key="mnist-published-version", description="Published model version")
    emit_event("mnist.model.published", resource=model_resource(store, published.version),
               payload={**published.model_dump(), "metrics": summary})
    return published


@task(name="record-rejection")
def record_rejection(reason: str, metrics: Evaluation, lineage: Lineage) -> None:
    """Rejections go into the registry history too: it answers what was tried, not only what shipped."""
    store = ModelStore(StoreSettings())
    summary = metric_summary(metrics)
    store.record({"event": "rejected", "reason": reason, **run_of(lineage.as_manifest()), "metrics": summary})
    emit_event("mnist.model.rejected", resource=model_resource(store), payload={"reason": reason, "metrics": summary})
    update_registry_overview(store)


@task(name="rollback")
def rollback_label(label: str, flow_run_id: str | None) -> LabelMoved:
    store = ModelStore(StoreSettings())
    previous, current = store.rollback(label, {**current_run(), "flow_run_id": flow_run_id})
    update_registry_overview(store)
    get_run_logger().info("%s moved back from version %d to version %d", label, previous, current)
    return LabelMoved(label=label, previous=previous, current=current)


# --- live check after publish ---------------------------------------------------
GOLDEN_SIZE = 64
GOLDEN_TOLERANCE = 1e-4


def compare_golden(served, offline) -> str | None:
    """None when the served answers match the offline ones, else the reason."""
    disagree = int((served.argmax(axis=1) != offline.argmax(axis=1)).sum())
    difference = float(abs(served - offline).max())
    if disagree or difference > GOLDEN_TOLERANCE:
        return (f"served predictions differ from offline ones on the golden set: {disagree} digits disagree, "
                f"max probability difference {difference:.2e} (tolerance {GOLDEN_TOLERANCE})")
    return None


def live_check_version(address: str, model_name: str, version: int, saved_model: Path, golden, timeout: float,
                       key: LiveCheckKey | None) -> str | None:
    """Wait for ``version`` to be served, then compare its answers with the SavedModel's; None if all is well.
    The request carries an id signed with ``key`` (``storage/live_check.py``), so that a logging
    gateway's readers keep it out of drift and feedback; with no key it is served traffic."""
    from mnist_client.client import ServingError, Target, predict_call, wait_until_available
    from tasks.export import saved_model_predict

    target = Target(address, model_name, version=version)
    state = wait_until_available(target, [version], timeout).get(version)
    if state == "END":
        return f"version {version} ended at {address} without becoming AVAILABLE (a failed load)"
    if state != "AVAILABLE":
        return f"version {version} did not become AVAILABLE at {address} within {timeout:g}s"
    try:
        served = predict_call(golden, target, request_id=key.request_id(version) if key else None).probabilities
    except ServingError as error:
        return f"golden-set request to {address} failed: {error}"
    return compare_golden(served, saved_model_predict(saved_model, golden))


def undo_publish(store: ModelStore, label: str, flow_run_id: str | None, reason: str) -> str:
    """After a failed live check, move ``stable`` back, or drop the label (``canary``, or a first
    ``stable`` with no version before it: no label names a version that failed). Says which."""
    event = {**current_run(), "flow_run_id": flow_run_id, "reason": reason}
    if label == "stable":
        try:
            previous, current = store.rollback("stable", event)
            return f"stable moved back from version {previous} to version {current}"
        except NothingToRollBack:
            pass  # a first version: nothing before it for stable to name
    store.set_label(label, None, event)
    return f"label {label} removed"


@task(name="live-check", timeout_seconds=900)
def live_check(published: PublishedVersion, saved_model: str, prepared_path: str, address: str,
               timeout: float, flow_run_id: str | None) -> LiveCheck:
    """Golden set over gRPC against offline predictions; undo the label on failure."""
    from tasks.data import load_test_set

    store = ModelStore(StoreSettings())
    key = live_check_key(TrafficSettings())
    logger = get_run_logger()
    logger.info("%s", key_note(key))
    x_test, _ = load_test_set(Path(prepared_path))
    reason = live_check_version(address, store.settings.model_name, published.version, Path(saved_model),
                                x_test[:GOLDEN_SIZE], timeout, key)
    if reason is None:
        logger.info("live check passed: version %d answers %d golden digits as offline", published.version,
                    GOLDEN_SIZE)
        return LiveCheck(passed=True, summary=f"live check passed at {address}")
    undone = undo_publish(store, published.label, flow_run_id, reason)
    logger.error("live check failed: %s; %s", reason, undone)
    update_registry_overview(store)
    return LiveCheck(passed=False, summary=f"live check failed, {undone}: {reason}")
