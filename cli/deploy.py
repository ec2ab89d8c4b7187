"""``mnist deploy`` and ``mnist worker``: scheduled runs, and the worker that executes them here."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cli.common import CliError, pipeline_settings
from storage.settings import AutomationSettings, prefect_api_url


def wait_for_configured_api(seconds: float) -> None:
    """The API PREFECT_API_URL names, waited for a bounded time: ``make deploy`` right after
    ``make prefect`` meets a server still starting."""
    from flows.prefect_api import ApiUnreachable, wait_for_api

    api_url = prefect_api_url()
    if not api_url:
        return
    if seconds < 0:
        raise CliError(f"--wait {seconds:g}: must be 0 or more", exit_code=2)
    try:
        wait_for_api(api_url.rstrip("/"), seconds)
    except ApiUnreachable as error:
        raise CliError(str(error)) from None


def command_deploy(args: argparse.Namespace) -> int:
    from flows.deploy import MissingExtra, deploy

    project = Path(__file__).resolve().parents[1]
    wait_for_configured_api(args.wait)
    try:
        result = deploy(project, AutomationSettings().notify_block, args.pool_type)
    except MissingExtra as error:
        raise CliError(str(error), exit_code=2) from None
    except Exception as error:  # noqa: BLE001  the API's own message is the useful one
        raise CliError(f"deploy failed: {error}") from None
    print(f"deployments: {', '.join(result['deployments'])}")
    print(f"work pools created: {result['created_work_pools'] or 'none (already there)'}")
    print(f"automations: {', '.join(result['automations'])}")
    print(WORKER_HINTS[args.pool_type])
    return 0


WORKER_HINTS = {
    "process": "next: make worker runs them (with make serve running, each training run live-checks what it "
               "publishes); watch them in the Prefect UI",
    "kubernetes": "next: run a Kubernetes worker in the cluster (prefect worker start --pool mnist-kubernetes, e.g. "
                  "the prefect-worker Helm chart) and create the Secret mnist-s3 (README: scaling out)",
    "docker": "next: on the Docker host, build the image (make image) and run prefect worker start --pool "
              "mnist-docker there, with the S3 identity in /etc/mnist/aws (README: scaling out)",
}


def command_worker(args: argparse.Namespace) -> int:
    """A process worker with the model store reachable (the embedded one when none is set). SIGTERM
    or Ctrl-C stops Prefect's worker as Ctrl-C does (SIGINT), waits ``--grace-seconds`` for it
    and the flow runs it started, then kills what is left of them; exit 0 on a requested stop."""
    import signal
    import subprocess

    from storage.embedded import descendants, process_alive, store_environment

    if args.grace_seconds < 0:
        raise CliError(f"--grace-seconds {args.grace_seconds:g}: must be 0 or more", exit_code=2)
    # a job started in the background by a non-interactive shell inherits SIGINT ignored, and
    # Python then never raises KeyboardInterrupt: SIGINT stops this worker however it was started
    signal.signal(signal.SIGINT, signal.default_int_handler)
    wait_for_configured_api(args.wait)
    with store_environment(pipeline_settings().state_dir):
        # its own process group: the stop below reaches the worker and every flow run it started
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", args.pool],
                                  start_new_session=True)
        try:
            return worker.wait()
        except (KeyboardInterrupt, SystemExit):
            family = descendants(worker.pid)  # its flow runs too, in sessions of their own
            stop_group(worker, signal.SIGINT, args.grace_seconds)
            for pid in family:
                if process_alive(pid):
                    os.kill(pid, signal.SIGKILL)
            end_runs_left(args.pool, family)
            print("mnist worker: stopped", flush=True)
            return 0


def end_runs_left(pool: str, pids: set[int]) -> None:
    """The runs the stopped worker was executing end Crashed now, in one line each, instead of
    staying Running until the zombie automation notices their silence."""
    from flows.prefect_api import end_runs_of

    try:
        ended = end_runs_of(pool, pids, "its worker was stopped (mnist worker) before the run ended")
    except Exception as error:  # noqa: BLE001  the API gone too: the zombie automation still ends them
        print(f"mnist worker: could not end its runs ({type(error).__name__}: {str(error)[:200]}); the "
              "automation 'mnist: crash runs whose heartbeats stopped' will", flush=True)
        return
    for name in ended:
        print(f"mnist worker: run {name} ended Crashed: its worker was stopped", flush=True)


def stop_group(process, first_signal: int, grace_seconds: float) -> None:
    """``first_signal`` to the process's group; SIGKILL to it if the process has not ended in time."""
    import signal
    import subprocess

    try:
        os.killpg(process.pid, first_signal)
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        print(f"mnist worker: Prefect's worker did not stop within {grace_seconds:g} s; killing it", flush=True)
    except ProcessLookupError:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # flow runs it started and left behind, too
    except ProcessLookupError:
        pass
    process.wait()


def add_scheduling_parsers(commands: argparse._SubParsersAction) -> None:
    deploy = commands.add_parser("deploy", help="create the work pool, deployments and automations from prefect.yaml",
                                 description="Apply prefect.yaml to the server PREFECT_API_URL names: the "
                                             "deployments of one kind of work pool, the pool and the automations.")
    deploy.add_argument("--pool-type", choices=("process", "kubernetes", "docker"), default="process",
                        help="where the runs execute: a process worker here (make worker; default), a Kubernetes "
                             "cluster (extra [kubernetes]) or a Docker host (extra [docker])")
    deploy.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for the Prefect API to answer (default 60)")
    deploy.set_defaults(handler=command_deploy)
    worker = commands.add_parser(
        "worker", help="start a Prefect process worker with the model store reachable",
        description="A Prefect process worker for the deployments' work pool (what make worker runs), with "
                    "MNIST_S3_ENDPOINT pointing at the store (the embedded one, started when needed), so the "
                    "runs it executes can publish.")
    worker.add_argument("--pool", default="mnist-process")
    worker.add_argument("--grace-seconds", type=float, default=20.0,
                        help="on SIGTERM or Ctrl-C, how long Prefect's worker may take to stop before it is "
                             "killed (default 20)")
    worker.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for the Prefect API to answer (default 60)")
    worker.set_defaults(handler=command_worker)
