"""Runs queued behind the one training slot say whom they wait for.

Training deployments share the work queue ``training``, which hands out one run at a time in the
order runs were queued (make deploy gives it a concurrency limit of 1). A run waiting there is only
"Scheduled", then "Late" in the UI; the run holding the slot names itself on each waiting run, at its
start and after each epoch, so a person reading the queue sees what it waits for.
"""

from __future__ import annotations

from datetime import datetime, timezone
from uuid import UUID

TRAINING_QUEUE = "training"
WAITING = "AwaitingConcurrencySlot"  # Prefect's own name for a run waiting for a concurrency slot


def waiting_message(holder_name: str, holder_deployment: str) -> str:
    return (f"waits for run '{holder_name}' ({holder_deployment}), which holds the {TRAINING_QUEUE} "
            "queue's one slot; it starts when that run ends, runs queued before it first")


def name_the_slot_holder(run_id: str | None = None) -> list[str]:
    """Mark every run waiting in this run's work queue (``run_id``, else the current run's) with
    this run's name. Returns the names of the runs marked now (those already marked are left
    alone, so their state history stays short)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterNextScheduledStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterWorkQueueName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.runtime import flow_run
    from prefect.states import Scheduled

    run_id = run_id or flow_run.get_id()
    if not run_id:
        return []
    marked = []
    with get_client(sync_client=True) as client:
        holder = client.read_flow_run(UUID(run_id))
        if holder.work_queue_name != TRAINING_QUEUE or holder.work_queue_id is None:
            return []
        deployment = client.read_deployment(holder.deployment_id).name if holder.deployment_id else "no deployment"
        message = waiting_message(holder.name, deployment)
        waiting = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
            work_queue_name=FlowRunFilterWorkQueueName(any_=[TRAINING_QUEUE]),
            # due now: a run scheduled for next Monday is not waiting for anyone yet
            next_scheduled_start_time=FlowRunFilterNextScheduledStartTime(before_=datetime.now(timezone.utc))))
        for run in waiting:
            if run.id == holder.id or run.work_pool_id != holder.work_pool_id or run.state is None:
                continue
            if run.state.name == WAITING and run.state.message == message:
                continue
            # the same scheduled time: the queue's order is by it, and a waiting run keeps its place
            place = run.state.state_details.scheduled_time or run.next_scheduled_start_time
            client.set_flow_run_state(run.id, Scheduled(name=WAITING, message=message, scheduled_time=place),
                                      force=True)
            marked.append(run.name)
    return marked
