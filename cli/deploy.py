"""``mnist deploy`` and ``mnist worker``: scheduled runs, and the worker that executes them here."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cli.common import CliError, pipeline_settings


def command_deploy(args: argparse.Namespace) -> int:
    from flows.deploy import MissingExtra, deploy

    project = Path(__file__).resolve().parents[1]
    try:
        result = deploy(project, project / "prefect.yaml", os.environ.get("MNIST_NOTIFY_BLOCK"), args.pool_type)
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
    """A process worker with the model store reachable (the embedded one when none is set)."""
    import subprocess

    from storage.embedded import store_environment

    with store_environment(pipeline_settings().state_dir):
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", args.pool])
        try:
            return worker.wait()
        except (KeyboardInterrupt, SystemExit):
            worker.terminate()  # let the worker finish its shutdown, then the store stops
            worker.wait(timeout=60)
            return 0


def add_scheduling_parsers(commands: argparse._SubParsersAction) -> None:
    deploy = commands.add_parser("deploy", help="create the work pool, deployments and automations from prefect.yaml",
                                 description="Apply prefect.yaml to the server PREFECT_API_URL names: the "
                                             "deployments of one kind of work pool, the pool and the automations.")
    deploy.add_argument("--pool-type", choices=("process", "kubernetes", "docker"), default="process",
                        help="where the runs execute: a process worker here (make worker; default), a Kubernetes "
                             "cluster (extra [kubernetes]) or a Docker host (extra [docker])")
    deploy.set_defaults(handler=command_deploy)
    worker = commands.add_parser(
        "worker", help="start a Prefect process worker with the model store reachable",
        description="A Prefect process worker for the deployments' work pool (what make worker runs), with "
                    "MNIST_S3_ENDPOINT pointing at the store (the embedded one, started when needed), so the "
                    "runs it executes can publish.")
    worker.add_argument("--pool", default="mnist-process")
    worker.set_defaults(handler=command_worker)
