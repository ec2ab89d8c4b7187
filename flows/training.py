"""The training flow: prepare → train → evaluate → gate → report → export. Wiring only."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from flows.ingest import feedback_batch
from flows.params import TrainingParams
from serving.stack import live_check_address
from storage.settings import PipelineSettings, StoreSettings
from tasks.data import prepare_data
from tasks.export import export
from tasks.gate import (
    REJECTED,
    accuracy_gate,
    champion_checks,
    gate,
    poisoning_checks,
    rejection_state,
    skipped_checks,
    slice_checks,
)
from tasks.publish import check_for_changes, forced_repeat, live_check, publish, record_rejection, stable_seed
from tasks.recipes import TrainConfig
from tasks.report import outcome_tags, report, tag_run, verdict_line
from tasks.results import (
    Evaluation,
    ExportedModel,
    Lineage,
    LiveCheck,
    PublishedVersion,
    RunOutcome,
    SkippedRun,
    StableScores,
    StableSummary,
    TrainedModel,
    TrainingData,
    TrainingResult,
    Verdict,
    slice_accuracies,
)
from tasks.run_queue import name_the_slot_holder
from tasks.scoring import evaluate, evaluate_stable
from tasks.train import code_version, library_versions, train


def new_run_dir(output_dir: Path) -> Path:
    """``<output>/runs/<UTC time>-<flow run name>``: one folder per run, never overwritten."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = output_dir / "runs" / f"{stamp}-{flow_run.name or 'local'}"
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def another_seed(seed: int) -> int:
    """A random seed other than ``seed``, for a forced retrain that would otherwise repeat stable."""
    import secrets

    return (seed + 1 + secrets.randbelow(2**31 - 2)) % (2**31 - 1)


def run_lineage(data: TrainingData, params: TrainingParams, config: TrainConfig) -> Lineage:
    return Lineage(flow_run_id=str(flow_run.id), flow_run_name=flow_run.name, data_fingerprint=data.fingerprint,
                   dataset=data.dataset, code_version=code_version(), library_versions=library_versions(),
                   preset=params.preset, config=config.model_dump(), new_data_weight=params.new_data_weight)


def training_result(run_dir: Path, metrics: Evaluation, verdict: Verdict, stable: StableScores | None,
                    exported: ExportedModel, published: PublishedVersion | None, outputs: dict[str, str]
                    ) -> TrainingResult:
    return TrainingResult(
        run_dir=str(run_dir), test_accuracy=metrics.test_accuracy,
        gate=[*verdict.checks, *(f"not checked: {why}" for why in verdict.skipped)],
        slices=slice_accuracies(metrics.slices), stable_slices=slice_accuracies(stable.slices) if stable else {},
        stable=StableSummary(version=stable.version, test_accuracy=stable.test_accuracy) if stable else None,
        saved_model=exported.path, version=exported.version, published=published, outputs=outputs)


def show_rejection_as_failure(flow, flow_run, state: State) -> None:
    """On the server, a Rejected run becomes a FAILED-type state of the same name and message, so
    the UI's badge is red rather than success's green. The flow itself ends COMPLETED (an outcome,
    not a crash): a returned Failed state makes Prefect's engine raise it and log a traceback."""
    if state.name != REJECTED:
        return
    from prefect.client.orchestration import get_client
    from prefect.logging.loggers import flow_run_logger

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, Failed(name=REJECTED, message=state.message), force=True)
    flow_run_logger(flow_run, flow).info("the run's state shows as Failed (Rejected) in the UI")


def name_waiting_runs(flow, flow_run, state: State) -> None:
    """On start: the runs queued behind this one say they wait for it (again after each epoch).
    A hook runs outside the run's context: its logger is the run's by its id, not get_run_logger."""
    from prefect.logging.loggers import flow_run_logger

    waiting = name_the_slot_holder(str(flow_run.id))
    if waiting:
        flow_run_logger(flow_run, flow).info("queued behind this run, in order: %s", ", ".join(waiting))


class QuietHooks(logging.Filter):
    """Prefect logs "Running hook ..." and "Hook ... finished running successfully" for every run's
    hooks: a run that published would read as if something were rejected. The hooks say what they
    did themselves; an error in one still shows."""

    ROUTINE = re.compile(r"^(Running hook|Hook) '(show_rejection_as_failure|name_waiting_runs)'"
                         r"( in response to entering state| finished running successfully)")

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.ROUTINE.match(record.getMessage())


for engine_logger in ("prefect.flow_runs", "prefect.engine"):  # before the run's logger exists, the engine's
    logging.getLogger(engine_logger).addFilter(QuietHooks())


@dataclass
class RunPlan:
    """What a run trains on and where it writes, settled before training."""

    params: TrainingParams
    config: TrainConfig
    data: TrainingData
    lineage: Lineage
    run_dir: Path
    output_dir: Path
    feedback: str | None  # the feedback ingest's one-line outcome, when the run took feedback


def settled_params(params: TrainingParams, force: bool) -> tuple[TrainingParams, bool]:
    """``params`` with ``force`` folded in and, for a publishing run given no seed, stable's seed
    (unchanged data then compares equal to stable); and whether a seed was given."""
    if force:
        params = params.model_copy(update={"force": True})
    seed_given = params.seed is not None
    if params.publish and not seed_given and (inherited := stable_seed()) is not None:
        params = params.model_copy(update={"seed": inherited})
    return params, seed_given


def mnist_dir(params: TrainingParams, settings: PipelineSettings) -> str | None:
    """The run's MNIST folder: its parameter, else MNIST_DATA_DIR's (or the one beside the checkout)."""
    return params.data_dir or (str(settings.data_dir) if settings.data_dir else None)


def prepared(params: TrainingParams, settings: PipelineSettings, use_store: bool) -> tuple[TrainConfig, TrainingData]:
    config = params.train_config()
    return config, prepare_data(mnist_dir(params, settings), str(settings.cache_dir), config.validation_size,
                                config.seed, config.train_limit, params.dataset_version, params.new_data_weight,
                                use_store=use_store)


def plan_run(params: TrainingParams, settings: PipelineSettings) -> RunPlan:
    output_dir = Path(params.output_dir) if params.output_dir else settings.output_dir
    run_dir = new_run_dir(output_dir)
    feedback = None
    if params.ingest_feedback and params.publish:  # corrections of served answers become data before it is read
        feedback = feedback_batch(mnist_dir(params, settings))
    # A run that publishes reads the dataset store it publishes beside; one that does not stays
    # off the store (a local experiment) unless a dataset version is asked for.
    config, data = prepared(params, settings, use_store=params.publish or params.dataset_version is not None)
    return RunPlan(params, config, data, run_lineage(data, params, config), run_dir, output_dir, feedback)


def skipped(plan: RunPlan, reason: str, tags: list[str]) -> State:
    tag_run(tags)
    return Completed(message=reason, data=SkippedRun(skipped=reason, run_dir=str(plan.run_dir)))


def reseeded_if_repeat(plan: RunPlan, seed_given: bool, settings: PipelineSettings) -> RunPlan | State:
    """A forced retrain of the same data, code, recipe and seed as stable would publish the same model
    again: with a seed given, it is skipped; without, it draws another seed and prepares again."""
    if not (plan.params.publish and plan.params.force) or (repeat := forced_repeat(plan.lineage)) is None:
        return plan
    seed = plan.config.seed
    if seed_given:
        return skipped(plan, f"skipped: forced, but seed {seed} on the same data, code and recipe would reproduce "
                             f"version {repeat} (stable); give another --seed, or none for a new one",
                       ["skipped", "would-reproduce-stable"])
    params = plan.params.model_copy(update={"seed": another_seed(seed)})
    get_run_logger().info("forced retrain of what stable v%d was trained on: seed %d instead of %d, so that it "
                          "trains a new model (--seed chooses one)", repeat, params.seed, seed)
    config, data = prepared(params, settings, use_store=True)
    return replace(plan, params=params, config=config, data=data, lineage=run_lineage(data, params, config))


def unchanged(plan: RunPlan) -> State | None:
    """A scheduled run with nothing new since stable: skipped, its tags saying why."""
    if not plan.params.publish or plan.params.force:
        return None
    skip = check_for_changes(plan.lineage, plan.params.min_new_examples)
    if skip is None:
        return None
    return skipped(plan, skip.reason, ["skipped", skip.tag])  # what happened, not what could have


def trained_model(plan: RunPlan) -> TrainedModel:
    if plan.params.candidates > 1:
        from flows.candidates import train_candidates  # Dask only when asked for

        return train_candidates(plan.data.path, plan.config, str(plan.run_dir), plan.params.candidates)
    return train(plan.data.path, plan.config, str(plan.run_dir))


def scored(plan: RunPlan, trained: TrainedModel, settings: PipelineSettings) -> tuple[Evaluation, StableScores | None]:
    """The candidate's scores, and stable's on the same test set when the run publishes."""
    slices = None
    if plan.data.dataset and plan.data.dataset.test_examples >= settings.dask_slice_examples:
        from flows.slices import score_slices_on_dask  # Dask only when the slices outgrow this process

        slices = score_slices_on_dask(trained.model_path, plan.data.path, os.cpu_count() or 1)
    params = plan.params
    metrics = evaluate(trained.model_path, plan.data.path, str(plan.run_dir), slices,
                       inspect=params.publish and params.shortcut_follow > 0)
    return metrics, evaluate_stable(plan.data.path, metrics.triggers_path) if params.publish else None


def judged(plan: RunPlan, metrics: Evaluation, stable: StableScores | None) -> tuple[Verdict, list[str]]:
    """The gate's verdict on every check, and the notes on slices too small to judge."""
    params = plan.params
    sliced, slice_notes = slice_checks(metrics, stable, params.slice_threshold, params.slice_margin,
                                       params.min_slice_size)
    state = gate([accuracy_gate(metrics, params.threshold),
                  *champion_checks(metrics, stable, params.accuracy_margin, params.class_margin), *sliced,
                  *poisoning_checks(metrics, stable, params.moved_margin, params.shortcut_follow)],
                 skipped_checks(stable, params.publish, params.shortcut_follow), return_state=True)
    verdict = state.result()  # a Rejected state's data is the verdict too
    if not isinstance(verdict, Verdict):
        raise TypeError(f"the gate answered {type(verdict).__name__}, not a verdict")
    return verdict, slice_notes


def rejected(plan: RunPlan, metrics: Evaluation, account: RunOutcome, verdict: Verdict) -> State:
    """Nothing is exported or published; the report tables every check, the state says the reason."""
    if plan.params.publish:
        record_rejection(verdict.reason, metrics, plan.lineage)
    report(str(plan.run_dir), plan.data.path, metrics, account)
    tag_run(outcome_tags(None, True, metrics.test_accuracy))
    return rejection_state(verdict)


def checked_live(published: PublishedVersion | None, exported: ExportedModel, plan: RunPlan,
                 settings: PipelineSettings) -> LiveCheck | None:
    """The live check of what was published, or why there was none (None: nothing published)."""
    if published is None:
        return None
    address, why = live_check_address(settings)
    if address:
        return live_check(published, exported.path, plan.data.path, address, settings.live_check_timeout,
                          plan.lineage.flow_run_id)
    print(why)  # in the run's log as in its report
    return LiveCheck(passed=None, summary=why)


def shipped(plan: RunPlan, trained: TrainedModel, metrics: Evaluation, stable: StableScores | None,
            account: RunOutcome, verdict: Verdict, settings: PipelineSettings) -> TrainingResult | State:
    """Export, publish when the run publishes, live-check, report."""
    params = plan.params
    exported = export(trained.model_path, plan.data.path, str(plan.output_dir), StoreSettings().model_name)
    published = publish(exported.path, metrics, plan.lineage, params.publish_label) if params.publish else None
    check = checked_live(published, exported, plan, settings)
    outcome = account.model_copy(update={"verdict": verdict_line(published, check), "published": published,
                                         "live_check": check})
    outputs = report(str(plan.run_dir), plan.data.path, metrics, outcome)
    tag_run(outcome_tags(published, False, metrics.test_accuracy, check))
    if check and check.passed is False:
        return Failed(message=check.summary)
    return training_result(plan.run_dir, metrics, verdict, stable, exported, published, outputs)


@flow(name="mnist-training", log_prints=True, validate_parameters=True, on_running=[name_waiting_runs],
      on_completion=[show_rejection_as_failure])
def training_flow(params: TrainingParams = TrainingParams(), force: bool = False) -> TrainingResult | State:
    """``force``: retrain even when nothing changed since stable, a checkbox of its own in the run
    form (also ``prefect deployment run ... --param force=true``), so forcing a scheduled run does
    not mean passing the whole ``params`` object."""
    settings = PipelineSettings()
    params, seed_given = settled_params(params, force)
    plan = reseeded_if_repeat(plan_run(params, settings), seed_given, settings)
    if isinstance(plan, State):
        return plan
    if (skip := unchanged(plan)) is not None:
        return skip
    trained = trained_model(plan)
    metrics, stable = scored(plan, trained, settings)
    verdict, slice_notes = judged(plan, metrics, stable)
    # the report's account, worded as a rejection; a pass replaces the verdict line with what followed
    account = RunOutcome(verdict=f"rejected: {verdict.reason}", gate=verdict, stable=stable, lineage=plan.lineage,
                         slice_notes=slice_notes, candidates=trained.candidates, feedback=plan.feedback)
    if not verdict.passed:
        return rejected(plan, metrics, account, verdict)
    return shipped(plan, trained, metrics, stable, account, verdict, settings)
