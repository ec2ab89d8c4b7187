"""Training runs queued behind a running one start in the order they were queued, wait without a
submission attempt per poll, and say which run they wait for. Real server, worker and runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from storage.embedded import stop_process
from tasks.run_queue import WAITING
from tests.flows.test_deployments import api, deployment
from tests.flows.test_zombie_runs import LONG_RUN, deployed, start_worker, wait_for_state

pytestmark = pytest.mark.faults


def states_of(server: dict[str, Any], run_id: str) -> list[dict[str, Any]]:
    return api(server, "GET", "/flow_run_states/", params={"flow_run_id": run_id})


def left_the_queue_at(server: dict[str, Any], run_id: str) -> str:
    """When the worker took the run: its first Pending state."""
    return min(s["timestamp"] for s in states_of(server, run_id) if s["type"] == "PENDING")


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    pytest.fail(f"not within {timeout:.0f} s: {what}")


def cancel(server: dict[str, Any], run_id: str) -> None:
    api(server, "POST", f"/flow_runs/{run_id}/set_state", json={"state": {"type": "CANCELLING", "name": "Cancelling"}})


def test_queued_runs_start_in_order_and_say_what_they_wait_for(tmp_path: Path, s3_server, mnist_dir: Path,
                                                                cache_dir: Path) -> None:
    with deployed(tmp_path, s3_server, mnist_dir, cache_dir, "run-queue") as (server, env):
        training = deployment(server)
        log = tmp_path / "worker.log"
        worker = start_worker(env, log)
        try:
            holder = api(server, "POST", f"/deployments/{training['id']}/create_flow_run",
                         json={"parameters": LONG_RUN})
            wait_for_state(server, holder["id"], {"RUNNING"}, 180)
            queued = []
            for _ in range(3):  # queued one after another while the first holds the slot
                queued.append(api(server, "POST", f"/deployments/{training['id']}/create_flow_run",
                                  json={"parameters": LONG_RUN}))
                time.sleep(1.5)

            def all_named() -> bool:
                runs = [api(server, "GET", f"/flow_runs/{run['id']}") for run in queued]
                return all(r["state_name"] == WAITING and holder["name"] in (r["state"]["message"] or "") for r in runs)

            wait_until(all_named, 120, f"the queued runs name {holder['name']} as what they wait for")
            time.sleep(25)  # two of the worker's polls and more with three runs due: none is submitted
            assert all(api(server, "GET", f"/flow_runs/{run['id']}")["state_type"] == "SCHEDULED" for run in queued)

            cancel(server, holder["id"])  # the slot frees: the queue moves one run at a time, oldest first
            for run in queued:
                wait_for_state(server, run["id"], {"RUNNING"}, 180)
                cancel(server, run["id"])
                wait_for_state(server, run["id"], {"CANCELLED", "CRASHED"}, 120)
            started = [left_the_queue_at(server, run["id"]) for run in queued]
            assert started == sorted(started), started
        finally:
            stop_process(worker.pid)
            worker.wait(timeout=60)
        printed = log.read_text()
        assert "Aborted submission" not in printed, printed[-3000:]
        assert "while running hook" not in printed, printed[-3000:]  # the naming hook never fails
