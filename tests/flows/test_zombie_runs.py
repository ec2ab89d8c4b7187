"""A run whose worker died is Crashed by the automation make deploy creates, and frees the slot the
next run waits for; a cancel reaches a run no worker is left to end. Real server, worker and runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from flows.deploy import CANCEL_WITHIN, HEARTBEAT_SECONDS, ZOMBIE_AFTER
from storage.embedded import stop_process
from tests.conftest import REPO, S3_ACCESS_KEY, S3_SECRET_KEY
from tests.flows.test_deployments import FAST_PARAMS, api, client_env, deployment, mnist_deploy, running_prefect_server

pytestmark = pytest.mark.faults
LONG_RUN = {"params": {**FAST_PARAMS["params"], "epochs": 200}}  # minutes: it is killed long before its end


@contextmanager
def deployed(tmp_path: Path, s3_server, mnist_dir: Path, cache_dir: Path, bucket: str
             ) -> Iterator[tuple[dict[str, Any], dict[str, str]]]:
    """A real Prefect server with make deploy's deployments and automations, and the environment a
    worker for it runs in (real MNIST, the session's S3 store)."""
    with running_prefect_server(tmp_path / "prefect") as server:
        mnist_deploy(server)
        yield server, client_env(server, MNIST_DATA_DIR=str(mnist_dir), MNIST_CACHE_DIR=str(cache_dir),
                                 MNIST_OUTPUT_DIR=str(tmp_path / "outputs"), MNIST_STATE_DIR=str(tmp_path / "state"),
                                 MNIST_S3_ENDPOINT=s3_server.endpoint, MNIST_S3_BUCKET=bucket,
                                 AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY,
                                 AWS_REGION="us-east-1")


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("a") as out:
        return subprocess.Popen([sys.executable, "-m", "cli", "worker"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_state(server: dict[str, Any], run_id: str, states: set[str], timeout: float) -> tuple[dict, float]:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        run = api(server, "GET", f"/flow_runs/{run_id}")
        if run["state_type"] in states:
            return run, time.monotonic() - started
        time.sleep(1)
    pytest.fail(f"run {run_id} still {run['state_name']} after {timeout:.0f} s (wanted {states})")


def beating(server: dict[str, Any], run_id: str, timeout: float = 120) -> None:
    """Until the server has heard the run's first heartbeat: the automation's window starts there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = api(server, "POST", "/events/filter", json={"filter": {
            "event": {"name": ["prefect.flow-run.heartbeat"]},
            "resource": {"id": [f"prefect.flow-run.{run_id}"]}}, "limit": 1})
        if events["events"]:
            return
        time.sleep(1)
    pytest.fail(f"no heartbeat from run {run_id} within {timeout:.0f} s")


def killed(worker: subprocess.Popen) -> None:
    """As a machine restart or an eviction ends it: SIGKILL to the worker and its runs, no clean-up."""
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=30)


def test_a_dead_workers_run_is_crashed_and_the_next_run_starts(tmp_path: Path, s3_server, mnist_dir: Path,
                                                               cache_dir: Path) -> None:
    with deployed(tmp_path, s3_server, mnist_dir, cache_dir, "zombie-runs") as (server, env):
        training = deployment(server)
        log = tmp_path / "worker.log"
        worker = start_worker(env, log)
        try:
            first = api(server, "POST", f"/deployments/{training['id']}/create_flow_run", json={"parameters": LONG_RUN})
            wait_for_state(server, first["id"], {"RUNNING"}, 180)
            waiting = api(server, "POST", f"/deployments/{training['id']}/create_flow_run",
                          json={"parameters": LONG_RUN})  # the next scheduled run, queued behind it
            beating(server, first["id"])
            killed(worker)
            crashed, after = wait_for_state(server, first["id"], {"CRASHED"}, ZOMBIE_AFTER.seconds + 60)
            assert "heartbeat" in crashed["state"]["message"]
            print(f"crashed {after:.0f} s after the kill (beat {HEARTBEAT_SECONDS} s, window {ZOMBIE_AFTER.seconds} s)")
            assert api(server, "GET", f"/flow_runs/{waiting['id']}")["state_type"] != "RUNNING"

            worker = start_worker(env, log)  # the slot is free: the waiting run starts
            _, after = wait_for_state(server, waiting["id"], {"RUNNING"}, 120)
            print(f"the waiting run started {after:.0f} s after the new worker")

            beating(server, waiting["id"])
            killed(worker)  # and a cancel of a run whose worker is gone ends Cancelled, not Cancelling
            api(server, "POST", f"/flow_runs/{waiting['id']}/set_state",
                json={"state": {"type": "CANCELLING", "name": "Cancelling"}})
            cancelled, after = wait_for_state(server, waiting["id"], {"CANCELLED", "CRASHED"},
                                              CANCEL_WITHIN.seconds + 60)
            assert cancelled["state_type"] == "CANCELLED", cancelled["state"]
            print(f"cancelled {after:.0f} s after the cancel")
        finally:
            if worker.poll() is None:
                stop_process(worker.pid)
                worker.wait(timeout=60)


def test_a_worker_stopped_on_purpose_ends_its_run_on_the_way_out(tmp_path: Path, s3_server, mnist_dir: Path,
                                                                  cache_dir: Path) -> None:
    """make worker stopped with SIGTERM (a supervisor, a deploy) mid-run: the run ends Crashed at
    once, by its own engine, not after the heartbeat window."""
    with deployed(tmp_path, s3_server, mnist_dir, cache_dir, "stopped-worker") as (server, env):
        worker = start_worker(env, tmp_path / "worker.log")
        try:
            run = api(server, "POST", f"/deployments/{deployment(server)['id']}/create_flow_run",
                      json={"parameters": LONG_RUN})
            wait_for_state(server, run["id"], {"RUNNING"}, 180)
            time.sleep(5)  # training under way
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
            ended, after = wait_for_state(server, run["id"], {"CRASHED", "CANCELLED", "FAILED"}, 30)
            print(f"{ended['state_name']} {after:.0f} s after the worker stopped")
        finally:
            if worker.poll() is None:
                stop_process(worker.pid)
                worker.wait(timeout=60)


def flow_run_process(worker: subprocess.Popen) -> int:
    """The flow run's own process under the worker (Prefect starts it in a session of its own)."""
    from storage.embedded import descendants

    for pid in descendants(worker.pid):
        try:
            if b"prefect.engine" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    pytest.fail("no prefect.engine process under the worker")


def test_a_paused_run_that_wakes_after_it_was_crashed_stops_training(tmp_path: Path, s3_server, mnist_dir: Path,
                                                                    cache_dir: Path) -> None:
    """A run frozen past the heartbeat window (a VM pause, a partition) is Crashed and its slot given
    away; when it wakes it stops at its next epoch instead of training beside the next run."""
    from storage.embedded import process_alive

    with deployed(tmp_path, s3_server, mnist_dir, cache_dir, "paused-run") as (server, env):
        worker = start_worker(env, tmp_path / "worker.log")
        try:
            run = api(server, "POST", f"/deployments/{deployment(server)['id']}/create_flow_run",
                      json={"parameters": LONG_RUN})
            wait_for_state(server, run["id"], {"RUNNING"}, 180)
            beating(server, run["id"])
            frozen = flow_run_process(worker)
            os.kill(frozen, signal.SIGSTOP)
            wait_for_state(server, run["id"], {"CRASHED"}, ZOMBIE_AFTER.seconds + 60)
            os.kill(frozen, signal.SIGCONT)
            woke = time.monotonic()
            while process_alive(frozen) and time.monotonic() - woke < 60:
                time.sleep(0.5)
            assert not process_alive(frozen), "the crashed run's process trains on after waking"
            print(f"the woken run stopped {time.monotonic() - woke:.0f} s after waking")
            ended = api(server, "GET", f"/flow_runs/{run['id']}")  # Crashed, or Failed by the woken engine
            assert ended["state_type"] in {"CRASHED", "FAILED"}, ended["state"]
        finally:
            if worker.poll() is None:
                stop_process(worker.pid)
                worker.wait(timeout=60)
