"""Apply prefect.yaml (or a pool type's own file) to a Prefect server: work pool, deployments, automations.

``prefect deploy`` does the deploying. Around it this module makes sure the
work pools exist, that a redeploy keeps schedules and deployments a person
paused as they are (they are written back into the config as paused before
deploying, so no scheduled run slips in), and that the automations exist.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, DoNothing, RunDeployment, SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.exceptions import ObjectNotFound
from prefect.flows import load_flow_from_entrypoint

from storage.errors import MnistError
from storage.settings import AutomationSettings
from tasks.run_queue import TRAINING_QUEUE

TRAINING_FLOW = "mnist-training"
# a gate rejection ends a run in the state named Rejected: COMPLETED for the engine, then FAILED
# on the server (flows/training.py); the automation fires once, on the second
FAILED_EVENTS = {"prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut",
                 "prefect.flow-run.Rejected"}
FAILED_STATE_TYPES = ["FAILED", "CRASHED"]
# A flow run says it lives every HEARTBEAT_SECONDS (PREFECT_FLOWS_HEARTBEAT_FREQUENCY in the
# deployments' job variables; Prefect's floor is 30); one whose beats stop for ZOMBIE_AFTER has
# lost its process: a killed worker, an evicted pod, a machine restart.
HEARTBEAT_SECONDS = 30
ZOMBIE_AFTER = timedelta(seconds=75)  # two missed beats and a half: a busy machine may be late with one
CANCEL_WITHIN = timedelta(seconds=30)  # a worker alive ends a cancelled run in seconds; before ZOMBIE_AFTER
FINAL_EVENTS = {"prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed"}


@cache
def flow_name(entrypoint: str, project_dir: Path) -> str:
    """The flow name behind an entrypoint, e.g. flows/training.py:training_flow -> mnist-training."""
    path, _, function = entrypoint.partition(":")
    return load_flow_from_entrypoint(f"{project_dir / path}:{function}").name


# Each work pool prefect.yaml names, by the kind of worker that runs it. One kind is deployed at a
# time (make deploy: process), so the weekly retrain is scheduled once, where its worker is.
POOL_TYPES = {"mnist-process": "process", "mnist-kubernetes": "kubernetes", "mnist-docker": "docker"}
EXTRAS = {"kubernetes": "prefect_kubernetes.worker:KubernetesWorker", "docker": "prefect_docker.worker:DockerWorker"}
S3_SECRET = "mnist-s3"  # the Kubernetes Secret the training jobs read their S3 identity from


class MissingExtra(MnistError, RuntimeError):
    """The worker package of a pool type is not installed."""


def worker_class(pool_type: str) -> Any:
    module, _, name = EXTRAS[pool_type].partition(":")
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except ImportError:
        raise MissingExtra(f"{pool_type} work pools need the {pool_type} extra: "
                           f"pip install -e '.[{pool_type}]'") from None


def base_job_template(pool_type: str) -> dict[str, Any] | None:
    """The pool's job template: the worker package's own, for Kubernetes with every container
    reading the S3 identity from the Secret mnist-s3 (never a job variable, which the UI shows)."""
    if pool_type == "process":
        return None
    template = copy.deepcopy(worker_class(pool_type).get_default_base_job_template())
    if pool_type == "kubernetes":
        job_spec = template["job_configuration"]["job_manifest"]["spec"]
        pod_spec = job_spec["template"]["spec"]
        # prefect-kubernetes 0.8 puts these Job fields in the pod spec, which the Kubernetes API
        # schema does not allow there (tests/flows/test_work_pools.py): they belong to the Job
        for field in ("completions", "parallelism"):
            if field in pod_spec:
                job_spec[field] = pod_spec.pop(field)
        for container in pod_spec["containers"]:
            container["envFrom"] = [{"secretRef": {"name": S3_SECRET}}]
    return template


def deployments_for(config: dict[str, Any], pool_type: str) -> dict[str, Any]:
    """prefect.yaml with only the deployments of one kind of pool."""
    unknown = sorted({d["work_pool"]["name"] for d in config["deployments"]} - set(POOL_TYPES))
    if unknown:
        raise ValueError(f"prefect.yaml names work pools of no known type: {unknown} (known: {sorted(POOL_TYPES)})")
    return {**config, "deployments": [d for d in config["deployments"]
                                      if POOL_TYPES[d["work_pool"]["name"]] == pool_type]}


def ensure_work_pools(config: dict[str, Any]) -> list[str]:
    """Create every work pool the (filtered) config names, with its type's job template, if missing."""
    created = []
    with get_client(sync_client=True) as client:
        for name in sorted({d["work_pool"]["name"] for d in config["deployments"]}):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                pool_type = POOL_TYPES[name]
                client.create_work_pool(WorkPoolCreate(name=name, type=pool_type,
                                                       base_job_template=base_job_template(pool_type) or {}))
                created.append(name)
    return created


def ensure_training_queues(config: dict[str, Any]) -> list[str]:
    """The work queue ``training`` of every pool a deployment sends training runs to, with a
    concurrency limit of 1: the server hands the worker one run at a time, oldest first, and the
    others wait as Scheduled without a submission attempt each poll. Returns the pools."""
    pools = sorted({d["work_pool"]["name"] for d in config["deployments"]
                    if d["work_pool"].get("work_queue_name") == TRAINING_QUEUE})
    with get_client(sync_client=True) as client:
        for pool in pools:
            try:
                queue = client.read_work_queue_by_name(TRAINING_QUEUE, work_pool_name=pool)
            except ObjectNotFound:
                client.create_work_queue(TRAINING_QUEUE, work_pool_name=pool, concurrency_limit=1,
                                         description="Training runs, one at a time, in the order they were queued.")
                continue
            if queue.concurrency_limit != 1:
                client.update_work_queue(queue.id, concurrency_limit=1)
    return pools


def keep_paused(config: dict[str, Any], project_dir: Path) -> dict[str, Any]:
    """The config with what is paused on the server marked paused, so a redeploy
    neither re-activates a paused schedule nor unpauses a paused deployment; and a schedule
    whose slug was renamed in the file replaces its old self rather than running beside it."""
    patched = copy.deepcopy(config)
    with get_client(sync_client=True) as client:
        for deployment in patched["deployments"]:
            full_name = f"{flow_name(deployment['entrypoint'], project_dir)}/{deployment['name']}"
            try:
                existing = client.read_deployment_by_name(full_name)
            except ObjectNotFound:
                continue
            if existing.paused:
                deployment["paused"] = True
            schedules = deployment.get("schedules") or []
            for schedule, old_slug in renamed_schedules(schedules, existing.schedules):
                schedule["replaces"] = old_slug
            paused_slugs = {s.slug for s in existing.schedules if s.slug and not s.active}
            for schedule in schedules:
                if schedule.get("replaces", schedule.get("slug")) in paused_slugs:
                    schedule["active"] = False
    return patched


def renamed_schedules(configured: list[dict[str, Any]], on_server: list[Any]) -> list[tuple[dict[str, Any], str]]:
    """Schedules of the file whose slug the server lacks, each with the slug of the server's schedule
    it renames: the same timing under a slug the file no longer names. Prefect keeps a schedule
    whose slug left the file, so without ``replaces`` a rename would schedule twice."""
    named = {schedule.get("slug") for schedule in configured}
    orphans = {server_timing(s.schedule): s.slug for s in on_server if s.slug and s.slug not in named}
    present = {s.slug for s in on_server}
    return [(schedule, orphans[file_timing(schedule)]) for schedule in configured
            if schedule.get("slug") not in present and file_timing(schedule) in orphans]


def file_timing(schedule: dict[str, Any]) -> tuple[Any, ...]:
    cron = schedule.get("cron")
    return cron, float(schedule["interval"]) if schedule.get("interval") else None, \
        schedule.get("timezone") if cron else None


def server_timing(schedule: Any) -> tuple[Any, ...]:
    cron, interval = getattr(schedule, "cron", None), getattr(schedule, "interval", None)
    return cron, interval.total_seconds() if interval else None, getattr(schedule, "timezone", None) if cron else None


def run_prefect_deploy(config: dict[str, Any], project_dir: Path) -> list[str]:
    """``prefect deploy --all``; its output is kept for a failure, not echoed: its closing hint
    (``prefect worker start``) is not how this project runs workers (``make worker``)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=project_dir, prefix=".deploy-", delete=False) as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    try:
        result = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all",
                                 "--prefect-file", handle.name], cwd=project_dir, capture_output=True, text=True)
    finally:
        os.unlink(handle.name)
    if result.returncode != 0:
        raise RuntimeError(f"prefect deploy exited {result.returncode}: {(result.stdout + result.stderr)[-2000:]}")
    return [f"{flow_name(d['entrypoint'], project_dir)}/{d['name']}" for d in config["deployments"]]


def notification_action(block: str | None):
    """SendNotification through the block named ``type-slug/name`` (MNIST_NOTIFY_BLOCK), else
    DoNothing: the automation still fires and shows in the UI's event feed."""
    if not block:
        return DoNothing()
    block_type, _, name = block.partition("/")
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(name=name, block_type_slug=block_type)
    return SendNotification(block_document_id=document.id, subject="MNIST pipeline: {{ event.event }}",
                            body="{{ event.resource.name }}: {{ event.event }} at {{ event.occurred }}")


def retrain_on_new_data(training_deployment_id: str, min_new: int) -> Automation:
    """Each ``mnist.data.added`` runs the training deployment with ``min_new_examples``: the run
    trains only once that many examples arrived since ``stable`` was trained, and skips otherwise.
    Events that arrive together fire once (a 5-minute window), and the training queue's limit of one
    run runs the retrains one after another: together, a debounce."""
    return Automation(
        name="mnist: retrain on new data",
        description=f"A retrain once at least {min_new} new labelled examples arrived since stable "
                    "(MNIST_RETRAIN_MIN_NEW); smaller additions wait for the next.",
        trigger=EventTrigger(expect={"mnist.data.added"}, posture=Posture.Reactive, threshold=1,
                             within=timedelta(minutes=5), match={"prefect.resource.id": "mnist.dataset.*"}),
        actions=[RunDeployment(source="selected", deployment_id=training_deployment_id,
                               parameters={"params": {"min_new_examples": min_new}})])


def retrain_on_drift(training_deployment_id: str) -> Automation:
    """``mnist.drift.detected`` runs the training deployment with ``ingest_feedback``: the corrections
    collected from the drifted traffic become data first, and the run trains when that (or anything
    else) is new; retraining on unchanged data cannot follow a drift, so such a run ends skipped.
    At most one run per 12 hours (a reactive trigger fires once per window), queued in the training queue."""
    return Automation(
        name="mnist: retrain on drift",
        description="A retrain, with the feedback collected so far, when the daily drift check finds the served "
                    "traffic has moved away from what the model was trained for (at most every 12 hours).",
        trigger=EventTrigger(expect={"mnist.drift.detected"}, posture=Posture.Reactive, threshold=1,
                             within=timedelta(hours=12), match={"prefect.resource.id": "mnist.model.*"}),
        actions=[RunDeployment(source="selected", deployment_id=training_deployment_id,
                               parameters={"params": {"ingest_feedback": True}})])


def who_hears(notify_block: str | None) -> str:
    """The end of a notifying automation's description: its action box alone does not say it."""
    if notify_block:
        return f" Notifies through the block {notify_block}."
    return (" Notifies nobody yet (MNIST_NOTIFY_BLOCK is unset, so its action does nothing): it shows in the event "
            "feed; name a notification block, e.g. MNIST_NOTIFY_BLOCK=slack-webhook/ops, and run make deploy again.")


def our_runs(flow_names: list[str]) -> dict[str, Any]:
    """Runs of this project's flows only: another project's runs on the same server may beat slower."""
    return {"prefect.resource.role": "flow", "prefect.resource.name": flow_names}


def crash_zombie_runs(flow_names: list[str]) -> Automation:
    """Prefect's documented answer to runs whose process died ("detect zombie flows"): a run that
    stops beating is Crashed, which ends it and frees its deployment's concurrency slot, so the
    next scheduled run starts instead of waiting behind it for good."""
    return Automation(
        name="mnist: crash runs whose heartbeats stopped",
        description=f"A flow run sent no heartbeat for {ZOMBIE_AFTER.seconds} s (its worker or process died): marked "
                    "Crashed, which frees its concurrency slot.",
        trigger=EventTrigger(after={"prefect.flow-run.heartbeat"},
                             expect={"prefect.flow-run.heartbeat", *FINAL_EVENTS},
                             match={"prefect.resource.id": "prefect.flow-run.*"}, match_related=our_runs(flow_names),
                             for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                             within=ZOMBIE_AFTER),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {ZOMBIE_AFTER.seconds} s: its worker or process died")])


def finish_orphaned_cancels(flow_names: list[str]) -> Automation:
    """A run cancelled while no worker watches it stays Cancelling (the worker is what ends it):
    after CANCEL_WITHIN it is set Cancelled."""
    return Automation(
        name="mnist: finish cancelling runs no worker ends",
        description=f"A flow run still Cancelling {CANCEL_WITHIN.seconds} s after a cancel (no worker is left to end "
                    "it): set Cancelled.",
        trigger=EventTrigger(after={"prefect.flow-run.Cancelling"}, expect=FINAL_EVENTS,
                             match={"prefect.resource.id": "prefect.flow-run.*"}, match_related=our_runs(flow_names),
                             for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                             within=CANCEL_WITHIN),
        actions=[ChangeFlowRunState(state=StateType.CANCELLED, force=True,
                                    message="cancelled: no worker was left to end the run")])


def automations(training_deployment_id: str, notify_block: str | None, flow_names: list[str]) -> list[Automation]:
    action, heard = notification_action(notify_block), who_hears(notify_block)
    return [
        crash_zombie_runs(flow_names),
        finish_orphaned_cancels(flow_names),
        retrain_on_new_data(training_deployment_id, AutomationSettings().retrain_min_new),
        retrain_on_drift(training_deployment_id),
        Automation(
            name="mnist: training run failed",
            description="A run of the training flow failed, crashed, timed out or was rejected by the gate." + heard,
            trigger=EventTrigger(expect=FAILED_EVENTS, posture=Posture.Reactive, threshold=1,
                                 match={"prefect.resource.id": "prefect.flow-run.*",
                                        "prefect.state-type": FAILED_STATE_TYPES},
                                 match_related={"prefect.resource.role": "flow",
                                                "prefect.resource.name": TRAINING_FLOW}),
            actions=[action]),
        Automation(
            name="mnist: serving disagrees with the registry",
            description="The serving-truth check found the server not serving what the registry says (a version "
                        "that failed to load, a label the server does not know) for longer than its grace period."
                        + heard,
            trigger=EventTrigger(expect={"mnist.serving.mismatch"}, posture=Posture.Reactive, threshold=1,
                                 within=timedelta(hours=1), match={"prefect.resource.id": "mnist.model.*"}),
            actions=[action]),
        Automation(
            name="mnist: weekly retrain missed",
            description="The scheduled training deployment has not completed a run in 8 days." + heard,
            trigger=EventTrigger(expect={"prefect.flow-run.Completed"}, posture=Posture.Proactive, threshold=1,
                                 within=timedelta(days=8),
                                 match_related={"prefect.resource.role": "deployment",
                                                "prefect.resource.id": f"prefect.deployment.{training_deployment_id}"}),
            actions=[action]),
    ]


def ensure_automations(config: dict[str, Any], project_dir: Path, notify_block: str | None) -> list[str]:
    """Create the automations, replacing earlier ones of the same name (redeploys stay idempotent)."""
    scheduled = next(d for d in config["deployments"] if d["entrypoint"].startswith("flows/training.py"))
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(
            f"{flow_name(scheduled['entrypoint'], project_dir)}/{scheduled['name']}")
        for existing in client.read_automations():
            if existing.name.startswith("mnist: "):
                client.delete_automation(existing.id)
    created = []
    flow_names = sorted({flow_name(d["entrypoint"], project_dir) for d in config["deployments"]})
    for automation in automations(str(deployment.id), notify_block, flow_names):
        automation.create()
        created.append(automation.name)
    return created


PREFECT_FILES = {"process": "prefect.yaml", "kubernetes": "prefect.kubernetes.yaml", "docker": "prefect.docker.yaml"}


def deploy(project_dir: Path, notify_block: str | None = None, pool_type: str = "process") -> dict[str, list[str]]:
    """The deployments of ``pool_type``'s file, with their pool and the automations."""
    prefect_file = project_dir / PREFECT_FILES[pool_type]
    config = yaml.safe_load(prefect_file.read_text())
    if deployments_for(config, pool_type)["deployments"] != config["deployments"]:
        raise ValueError(f"{prefect_file.name} holds deployments of another kind of pool than {pool_type}")
    pools = ensure_work_pools(config)
    ensure_training_queues(config)
    deployments = run_prefect_deploy(keep_paused(config, project_dir), project_dir)
    return {"deployments": deployments, "created_work_pools": pools,
            "automations": ensure_automations(config, project_dir, notify_block)}
