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
        if field.annotation is bool:
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=f"{field.description}{default}")
            continue
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=scalar_type(field.annotation),
                            default=None, help=f"{field.description}{default}")


def validation_message(error: ValidationError) -> str:
    problems = [f"--{'.'.join(str(p) for p in item['loc']).replace('_', '-')}: {item['msg']}"
                for item in error.errors()]
    return "invalid settings: " + "; ".join(problems)


def given_flags(args: argparse.Namespace, model: type) -> dict[str, Any]:
    return {name: getattr(args, name) for name in model.model_fields
            if getattr(args, name, None) is not None}


def pipeline_settings():
    from flows.settings import PipelineSettings

    return PipelineSettings()


def run_training(params) -> dict[str, Any]:
    """Run the training flow with a reachable store; raise CliError on a failed run."""
    from flows.training import training_flow
    from storage.embedded import store_environment

    if params.publish:
        with store_environment(pipeline_settings().state_dir):
            state = training_flow(params, return_state=True)
    else:
        state = training_flow(params, return_state=True)
    if not state.is_completed():
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
    try:
        params = TrainingParams(**values)
        params.train_config()  # refuse a bad combination before any work starts
    except ValidationError as error:
        raise CliError(validation_message(error), exit_code=2) from None
    return params


def command_run(args: argparse.Namespace) -> int:
    """The main job: train, gate, publish, sync, serve, live-check, query; stop all."""
    from flows.chain import ChainError, run_chain
    from serving.client import ServingError

    params = training_params(args)
    if not params.publish:
        raise CliError("mnist run serves what it publishes: drop --no-publish (or use mnist train)", exit_code=2)
    try:
        result, answers = run_chain(params, pipeline_settings().state_dir, args.queries)
    except (ChainError, ServingError) as error:
        raise CliError(str(error)) from None
    print_training_result(result)
    print(f"gRPC predictions from the served 'stable' model (MNIST test digits {args.queries}):")
    print_predictions(answers, as_json=False)
    correct = sum(answer["digit"] == answer["label"] for answer in answers)
    print(f"{correct}/{len(answers)} correct")
    return 0


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


def registry_store():
    from storage.models import ModelStore, StoreSettings

    try:
        return ModelStore(StoreSettings())
    except ValidationError as error:
        raise CliError(validation_message(error), exit_code=2) from None


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
        for row in [] if args.json else rows:
            accuracy = "-" if row["test_accuracy"] is None else f"{row['test_accuracy']:.4f}"
            print(f"{row['version']:>5}  {accuracy}  {row['published_at']}  {','.join(row['labels'])}")
    elif action == "show":
        print_json(store.manifest(args.version))
    elif action == "verify":
        try:
            manifest = store.verify(args.version)
        except VerificationFailed as error:
            if args.json:
                print_json({"version": args.version, "verified": False, "problem": str(error)})
            raise CliError(str(error)) from None
        if args.json:
            print_json({"version": args.version, "verified": True, "files": sorted(manifest["files"])})
        else:
            print(f"version {args.version}: {len(manifest['files'])} files match the manifest")
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
        for event in [] if args.json else events:
            details = {k: v for k, v in event.items() if k not in {"time", "event", "metrics"}}
            accuracy = (event.get("metrics") or {}).get("test_accuracy")
            shown = " ".join(f"{k}={v}" for k, v in details.items() if v is not None)
            print(f"{event['time']}  {event['event']:<9} {shown}" + (f" test_accuracy={accuracy:.4f}" if accuracy else ""))
    elif action == "gc":
        removed = store.gc(args.keep, args.grace_seconds)
        print(f"removed versions {removed['removed_versions'] or 'none'}, "
              f"leftovers {removed['removed_leftovers'] or 'none'}")
    return 0


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
    with reachable_store() as store:
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


def command_serve(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from serving.inference import PredictOptions
    from serving.manager import ModelManager
    from serving.model_config import ConfigRefused, read_model_config_file, single_model_config
    from serving.server import ModelServer, ServerOptions

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.model_config_file:
        try:
            config = read_model_config_file(Path(args.model_config_file))
        except ValueError as error:
            raise CliError(str(error), exit_code=2) from None
    elif args.model_base_path:
        config = single_model_config(args.model_name, Path(args.model_base_path).resolve())
    else:
        raise CliError("give --model-base-path (with --model-name) or --model-config-file", exit_code=2)
    options = ServerOptions(port=args.port, host=args.host, poll_seconds=args.file_system_poll_wait_seconds,
                            max_message_bytes=args.max_message_bytes, rest_api_port=args.rest_api_port,
                            ssl_config_file=Path(args.ssl_config_file) if args.ssl_config_file else None,
                            predict=PredictOptions(args.enable_serialization_as_tensor_content,
                                                   args.reject_non_finite_inputs))
    try:
        manager = ModelManager(config, args.allow_version_labels_for_unavailable_models)
        server = ModelServer(manager, options, Path(args.model_config_file) if args.model_config_file else None).start()
    except ConfigRefused as refusal:
        raise CliError(f"config refused: {refusal}", exit_code=2) from None
    except (ValueError, RuntimeError, OSError) as error:
        raise CliError(f"cannot start the server: {error}") from None
    served = {name: sorted(model.versions) for name, model in server.manager.models.items()}
    rest = f", REST on {args.host}:{server.rest.port}" if server.rest else ""
    print(f"mnist serve: listening on {args.host}:{server.port}{rest}, serving {served}", flush=True)
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0


def command_sync(args: argparse.Namespace) -> int:
    from serving.client import Target
    from serving.sync import SyncError, sync_once, watch

    base = Path(args.model_base_path)
    config_file = Path(args.model_config_file) if args.model_config_file else None
    with reachable_store() as store:
        server = Target(args.server, store.settings.model_name) if args.server else None
        if args.watch:
            watch(store, base, args.interval, config_file, args.config_base_path, server, args.load_timeout,
                  report=lambda line: print(line, flush=True))
            return 0
        try:
            result = sync_once(store, base, config_file, args.config_base_path, server, args.load_timeout)
        except SyncError as error:
            raise CliError(str(error)) from None
    pending = " (a label waits for its version to load: run again to move it)" if result.labels_pending else ""
    print(f"downloaded {result.downloaded or 'nothing'}, removed {result.removed or 'nothing'}, "
          f"serving {result.kept}, labels {result.labels}{pending}")
    return 0


def parse_range(text: str) -> tuple[int, int]:
    try:
        start, stop = (int(part) for part in text.split(":"))
    except ValueError:
        raise CliError(f"--mnist-test takes START:STOP, got {text!r}", exit_code=2) from None
    if not 0 <= start < stop <= 10000:
        raise CliError(f"--mnist-test {text}: need 0 <= START < STOP <= 10000", exit_code=2)
    return start, stop


def mnist_test_inputs(text: str) -> tuple[list[str], Any, list[int]]:
    from tasks.data import MNIST_SHA256, DataError, read_split, to_model_input

    start, stop = parse_range(text)
    data_dir = pipeline_settings().data_dir
    if data_dir is None:
        raise CliError("--mnist-test needs MNIST_DATA_DIR (the folder of the MNIST IDX files)", exit_code=2)
    try:
        test, _ = read_split(data_dir, "t10k", MNIST_SHA256)
    except DataError as error:
        raise CliError(str(error)) from None
    labels = [int(label) for label in test.labels[start:stop]]
    return [f"mnist-test[{i}]" for i in range(start, stop)], to_model_input(test.images[start:stop]), labels


def show_model(target) -> int:
    """The served version (from the server) and its lineage (from the model store's manifest)."""
    from serving.client import ServingError, model_status

    try:
        statuses = model_status(target)
    except ServingError as error:
        raise CliError(str(error)) from None
    available = [version for version, state in statuses if state == "AVAILABLE"]
    if not available:
        raise CliError(f"model {target.model_name!r} has no AVAILABLE version at {target.address}")
    version = max(available)
    print(f"model {target.model_name} at {target.address}: serving version {version} (states {statuses})")
    with reachable_store() as store:
        manifest = store.manifest(version)
        labels = [label for label, v in store.labels().items() if v == version]
    metrics = manifest.get("metrics", {})
    print(f"  labels:           {', '.join(labels) or '-'}")
    print(f"  published:        {manifest.get('published_at')}  {manifest.get('uri')}")
    print(f"  flow run:         {manifest.get('flow_run_id')}")
    if metrics.get("test_accuracy") is not None:
        print(f"  test accuracy:    {metrics['test_accuracy']:.4f} (loss {metrics['test_loss']:.4f})")
    print(f"  data fingerprint: {manifest.get('data_fingerprint')}")
    print(f"  code version:     {manifest.get('code_version')}")
    return 0


def command_predict(args: argparse.Namespace) -> int:
    from serving.client import ServingError, Target, predict
    from serving.images import InputError, read_inputs

    target = Target(args.server, args.model_name, args.model_version, args.label, args.timeout,
                    tls=args.tls, ca_cert=Path(args.ca_cert) if args.ca_cert else None)
    if args.show_model:
        return show_model(target)
    labels: list[int] | None = None
    if args.mnist_test:
        names, images, labels = mnist_test_inputs(args.mnist_test)
    elif args.files:
        try:
            names, images = read_inputs([Path(f) for f in args.files])
        except InputError as error:
            raise CliError(str(error)) from None
    else:
        raise CliError("give image or .npy FILES, --mnist-test START:STOP, or --show-model", exit_code=2)
    try:
        results = predict(images, address=target.address, model_name=target.model_name, version=target.version,
                          label=target.label, timeout=target.timeout, tls=target.tls, ca_cert=target.ca_cert,
                          names=names)
    except ServingError as error:
        raise CliError(str(error)) from None
    for result, label in zip(results, labels or [None] * len(results)):
        if label is not None:
            result["label"] = label
    print_predictions(results, args.json)
    return 0


def print_predictions(results: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print_json(results)
        return
    for result in results:
        top3 = "  ".join(f"{t['digit']}:{t['probability']:.3f}" for t in result["top3"])
        truth = f"  (true {result['label']})" if "label" in result else ""
        print(f"{result['input']}: {result['digit']} ({result['confidence']:.3f}){truth}  top3 {top3}  "
              f"[v{result['version']}]")


def command_deploy(args: argparse.Namespace) -> int:
    from flows.deploy import deploy

    project = Path(__file__).resolve().parents[1]
    try:
        result = deploy(project, project / "prefect.yaml", os.environ.get("MNIST_NOTIFY_BLOCK"))
    except Exception as error:  # noqa: BLE001  the API's own message is the useful one
        raise CliError(f"deploy failed: {error}") from None
    print(f"work pools created: {result['created_work_pools'] or 'none (already there)'}")
    print(f"automations: {', '.join(result['automations'])}")
    return 0


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


def add_serving_parsers(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="serve SavedModels over TF Serving's gRPC API",
                                description="A TF-Serving-compatible gRPC server (PredictionService, ModelService).")
    serve.add_argument("--port", type=int, default=8500, help="gRPC port; 0 picks a free one (default 8500)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--rest-api-port", type=int, default=0,
                       help="TF Serving's REST API (/v1/models/NAME[:predict]) on this port; 0 = off (default)")
    serve.add_argument("--model-base-path", help="the model's directory of numbered versions")
    serve.add_argument("--model-name", default="mnist", help="model name (default mnist)")
    serve.add_argument("--model-config-file", help="TF Serving models.config (text ModelServerConfig); re-read on change")
    serve.add_argument("--file-system-poll-wait-seconds", type=float, default=1.0,
                       help="how often to look for new versions (default 1)")
    serve.add_argument("--ssl-config-file", help="TF Serving SSLConfig text proto: server_key, server_cert, custom_ca")
    serve.add_argument("--max-message-bytes", type=int, default=64 << 20,
                       help="largest request or response (default 64 MiB; a batch of 1024 images is 3.2 MB)")
    serve.add_argument("--allow-version-labels-for-unavailable-models", action="store_true",
                       help="accept a new label on a version still loading (a label in use still moves only to "
                            "an AVAILABLE version), as TF Serving's flag of the same name")
    serve.add_argument("--enable-serialization-as-tensor-content", action="store_true",
                       help="answer Predict in packed tensor_content instead of float_val, as TF Serving's flag")
    serve.add_argument("--reject-non-finite-inputs", action="store_true",
                       help="refuse inputs holding NaN or infinity (TF Serving runs them through; off by default)")
    serve.set_defaults(handler=command_serve)

    sync = commands.add_parser("sync", help="mirror published versions from S3 into a model directory",
                               description="Verified, atomic S3 -> local sync for TF Serving (read-only access).")
    sync.add_argument("--model-base-path", required=True, help="local directory of numbered versions")
    sync.add_argument("--model-config-file", help="where to write models.config (default: beside the model dir)")
    sync.add_argument("--config-base-path", help="base_path to write into models.config (the path TF Serving sees)")
    sync.add_argument("--watch", action="store_true", help="keep syncing every --interval seconds")
    sync.add_argument("--interval", type=float, default=10.0, help="seconds between syncs with --watch (default 10)")
    sync.add_argument("--server", help="HOST:PORT of the model server: a label moves to a new version once the "
                                       "server reports it AVAILABLE (else on the next round)")
    sync.add_argument("--load-timeout", type=float, default=300.0,
                      help="seconds to wait for the server to load a new version (default 300)")
    sync.set_defaults(handler=command_sync)

    predict = commands.add_parser("predict", help="classify digits through a gRPC server",
                                  description="Query TF Serving (or mnist serve) over gRPC.")
    predict.add_argument("files", nargs="*", metavar="FILES", help="PNG/JPEG images or .npy arrays")
    predict.add_argument("--server", default=os.environ.get("MNIST_SERVING_ADDRESS", "localhost:8500"),
                         help="HOST:PORT (default: MNIST_SERVING_ADDRESS or localhost:8500)")
    predict.add_argument("--model-name", default="mnist")
    choice = predict.add_mutually_exclusive_group()
    choice.add_argument("--model-version", type=int, help="ask for this version")
    choice.add_argument("--label", help="ask for the version with this label (stable, canary)")
    predict.add_argument("--mnist-test", metavar="START:STOP", help="slice of the MNIST test set (needs MNIST_DATA_DIR)")
    predict.add_argument("--show-model", action="store_true", help="print the served version and its lineage")
    predict.add_argument("--json", action="store_true", help="one JSON list: input, digit, confidence, top3")
    predict.add_argument("--timeout", type=float, default=10.0, help="deadline per call in seconds (default 10)")
    predict.add_argument("--tls", action="store_true", help="use TLS")
    predict.add_argument("--ca-cert", help="CA certificate (PEM) to trust with --tls")
    predict.set_defaults(handler=command_predict)


def build_parser() -> argparse.ArgumentParser:
    from flows.params import TrainingParams

    parser = argparse.ArgumentParser(prog="mnist", description=(
        "Train, gate, publish and serve an MNIST digit classifier (Prefect, Keras, TF Serving)."))
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

    storage = commands.add_parser("storage", help="start, stop or show the embedded S3 store (SeaweedFS)")
    storage.add_argument("action", choices=("up", "down", "status"))
    storage.set_defaults(handler=command_storage)
    add_registry_parser(commands)
    from flows.cli_data import add_data_parser  # its own module: it builds on this one

    add_data_parser(commands)
    add_serving_parsers(commands)
    deploy = commands.add_parser("deploy", help="create the work pool, deployments and automations from prefect.yaml",
                                 description="Apply prefect.yaml to the server PREFECT_API_URL names.")
    deploy.set_defaults(handler=command_deploy)
    worker = commands.add_parser("worker", help="start a Prefect process worker with the model store reachable")
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
    try:
        return args.handler(args)
    except CliError as error:
        print(f"mnist {args.command}: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"mnist {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: command modules such as
    # flows.cli_data import flows.cli, and its CliError must be the one main() catches.
    from flows.cli import main as importable_main

    sys.exit(importable_main())
