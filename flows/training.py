"""The training flow: prepare → train → evaluate → gate → report → export. Wiring only."""

from __future__ import annotations

import logging
import os
import re
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
from tasks.gate import REJECTED, accuracy_gate, champion_checks, gate, poisoning_checks, skipped_checks, slice_checks
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


@flow(name="mnist-training", log_prints=True, validate_parameters=True, on_running=[name_waiting_runs],
      on_completion=[show_rejection_as_failure])
def training_flow(params: TrainingParams = TrainingParams(), force: bool = False) -> TrainingResult | State:
    """``force``: retrain even when nothing changed since stable, a checkbox of its own in the run
    form (also ``prefect deployment run ... --param force=true``), so forcing a scheduled run does
    not mean passing the whole ``params`` object."""
    if force:
        params = params.model_copy(update={"force": True})
    settings = PipelineSettings()
    seed_given = params.seed is not None
    if params.publish and not seed_given and (inherited := stable_seed()) is not None:
        params = params.model_copy(update={"seed": inherited})  # unchanged data then compares equal to stable
    config = params.train_config()
    output_dir = Path(params.output_dir) if params.output_dir else settings.output_dir
    data_dir = params.data_dir or (str(settings.data_dir) if settings.data_dir else None)
    run_dir = new_run_dir(output_dir)

    feedback = None
    if params.ingest_feedback and params.publish:
        feedback = feedback_batch(data_dir)  # corrections of served answers become data before the data is read
    # A run that publishes reads the dataset store it publishes beside; one that does not stays
    # off the store (a local experiment) unless a dataset version is asked for.
    data = prepare_data(data_dir, str(settings.cache_dir), config.validation_size, config.seed,
                        config.train_limit, params.dataset_version, params.new_data_weight,
                        use_store=params.publish or params.dataset_version is not None)
    lineage = run_lineage(data, params, config)
    if params.publish and params.force and (repeat := forced_repeat(lineage)) is not None:
        # the same data, code, recipe and seed as stable: training would publish the same model again
        if seed_given:
            message = (f"skipped: forced, but seed {config.seed} on the same data, code and recipe would reproduce "
                       f"version {repeat} (stable); give another --seed, or none for a new one")
            tag_run(["skipped", "would-reproduce-stable"])
            return Completed(message=message, data=SkippedRun(skipped=message, run_dir=str(run_dir)))
        params = params.model_copy(update={"seed": another_seed(config.seed)})
        get_run_logger().info("forced retrain of what stable v%d was trained on: seed %d instead of %d, so that it "
                              "trains a new model (--seed chooses one)", repeat, params.seed, config.seed)
        config = params.train_config()
        data = prepare_data(data_dir, str(settings.cache_dir), config.validation_size, config.seed,
                            config.train_limit, params.dataset_version, params.new_data_weight, use_store=True)
        lineage = run_lineage(data, params, config)
    if params.publish and not params.force:
        skip = check_for_changes(lineage, params.min_new_examples)
        if skip is not None:
            tag_run(["skipped", skip.tag])  # what happened, not what could have (force is in the message)
            return Completed(message=skip.reason, data=SkippedRun(skipped=skip.reason, run_dir=str(run_dir)))
    if params.candidates > 1:
        from flows.candidates import train_candidates  # Dask only when asked for

        trained = train_candidates(data.path, config, str(run_dir), params.candidates)
    else:
        trained = train(data.path, config, str(run_dir))
    slices = None
    if data.dataset and data.dataset.test_examples >= settings.dask_slice_examples:
        from flows.slices import score_slices_on_dask  # Dask only when the slices outgrow this process

        slices = score_slices_on_dask(trained.model_path, data.path, os.cpu_count() or 1)
    metrics = evaluate(trained.model_path, data.path, str(run_dir), slices,
                       inspect=params.publish and params.shortcut_follow > 0)
    stable = evaluate_stable(data.path, metrics.triggers_path) if params.publish else None
    sliced, slice_notes = slice_checks(metrics, stable, params.slice_threshold, params.slice_margin,
                                       params.min_slice_size)
    verdict = gate([accuracy_gate(metrics, params.threshold),
                    *champion_checks(metrics, stable, params.accuracy_margin, params.class_margin), *sliced,
                    *poisoning_checks(metrics, stable, params.moved_margin, params.shortcut_follow)],
                   skipped_checks(stable, params.publish, params.shortcut_follow), return_state=True).result()
    if not isinstance(verdict, Verdict):  # a Rejected state's data is the verdict too
        raise TypeError(f"the gate answered {type(verdict).__name__}, not a verdict")
    # the report's account, worded as a rejection; a pass replaces the verdict line with what followed
    judged = RunOutcome(verdict=f"rejected: {verdict.reason}", gate=verdict, stable=stable, lineage=lineage,
                        slice_notes=slice_notes, candidates=trained.candidates, feedback=feedback)
    if not verdict.passed:
        if params.publish:
            record_rejection(verdict.reason, metrics, lineage)
        report(str(run_dir), data.path, metrics, judged)
        tag_run(outcome_tags(None, True, metrics.test_accuracy))
        # nothing is exported or published; an expected outcome, so no traceback in the run's log.
        # The reason is short: the report tables every check.
        return Completed(name=REJECTED, message=verdict.reason)

    exported = export(trained.model_path, data.path, str(output_dir), StoreSettings().model_name)
    published = publish(exported.path, metrics, lineage, params.publish_label) if params.publish else None
    address, why = live_check_address(settings)
    check: LiveCheck | None
    if published and address:
        check = live_check(published, exported.path, data.path, address, settings.live_check_timeout,
                           lineage.flow_run_id)
    else:
        check = LiveCheck(passed=None, summary=why) if published else None
        if check:
            print(why)  # in the run's log as in its report
    outcome = judged.model_copy(update={"verdict": verdict_line(published, check), "published": published,
                                        "live_check": check})
    outputs = report(str(run_dir), data.path, metrics, outcome)
    tag_run(outcome_tags(published, False, metrics.test_accuracy, check))
    if check and check.passed is False:
        return Failed(message=check.summary)
    return training_result(run_dir, metrics, verdict, stable, exported, published, outputs)
