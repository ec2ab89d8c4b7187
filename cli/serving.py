"""``mnist up``, ``mnist sync`` and ``mnist predict``: the serving stack, what runs beside the model
server, and its client (``mnist serve`` itself: ``cli/serve.py``)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from cli.common import CliError, default_server, pipeline_settings, print_json, reachable_store, stop_on_signals
from cli.serve import add_serve_parser
from storage.settings import environment_values


def command_sync(args: argparse.Namespace) -> int:
    from mnist_client.client import Target
    from serving.sync import SyncError, sync_once, watch
    from storage.settings import SigningSettings

    base = Path(args.model_base_path)
    config_file = Path(args.model_config_file) if args.model_config_file else None
    usable_directory(base, "--model-base-path", create=True)
    if config_file:
        usable_directory(config_file.parent, "--model-config-file's folder", create=True)
    with reachable_store() as store:
        server = Target(args.server, store.settings.model_name) if args.server else None
        verify_key = SigningSettings().verify_key
        if args.watch:
            watch(store, base, args.interval, config_file, args.config_base_path, server, args.load_timeout,
                  verify_key, report=lambda line: print(line, flush=True))
            return 0
        try:
            result = sync_once(store, base, config_file, args.config_base_path, server, args.load_timeout,
                               verify_key)
        except SyncError as error:
            raise CliError(str(error)) from None
    pending = " (a label waits for its version to load: run again to move it)" if result.labels_pending else ""
    print(f"downloaded {result.downloaded or 'nothing'}, removed {result.removed or 'nothing'}, "
          f"serving {result.kept}, labels {result.labels}{pending}")
    if result.refused:
        raise CliError("; ".join(f"refused {reason}" for reason in result.refused.values()))
    return 0


def usable_directory(path: Path, flag: str, create: bool = False) -> None:
    """Refuse, in one line, a directory that cannot be used (made, if ``create``), before any work."""
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        if not path.is_dir():
            raise CliError(f"{flag} {path}: not a directory", exit_code=2)
        probe = path / f".mnist-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise CliError(f"{flag} {path}: cannot use it ({error.strerror or error})", exit_code=2) from None


def parse_range(text: str, flag: str = "--mnist-test") -> tuple[int, int]:
    try:
        start, stop = (int(part) for part in text.split(":"))
    except ValueError:
        raise CliError(f"{flag} takes START:STOP, got {text!r}", exit_code=2) from None
    if not 0 <= start < stop <= 10000:
        raise CliError(f"{flag} {text}: need 0 <= START < STOP <= 10000", exit_code=2)
    return start, stop


def mnist_test_inputs(text: str) -> tuple[list[str], Any, list[int]]:
    from tasks.data import NO_MNIST, DataError, mnist_test_digits

    start, stop = parse_range(text)
    data_dir = pipeline_settings().data_dir
    if data_dir is None:
        raise CliError(f"--mnist-test {NO_MNIST}", exit_code=2)
    try:
        return mnist_test_digits(data_dir, start, stop)
    except DataError as error:
        raise CliError(str(error)) from None


def show_model(target) -> int:
    """The served version (from the server) and its lineage (from the model store's manifest)."""
    from mnist_client.client import ServingError, model_status

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


def knows_label(target) -> bool:
    """Whether the server resolves ``target``'s label (TF Serving lists no labels: ask metadata, the
    answer the client keeps for the call that follows). Any other failure is left for that call."""
    from mnist_client.client import ServingError, shared_channel, tensor_names

    try:
        tensor_names(shared_channel(target), target)
    except ServingError as error:
        return "version label" not in str(error)
    return True


def command_predict(args: argparse.Namespace) -> int:
    from mnist_client.client import ServingError, Target, predict
    from mnist_client.images import InputError, read_inputs

    # stable unless told otherwise: the version people mean, and the one a rollback moves
    by_default = args.label is None and not args.latest and args.model_version is None
    label = None if args.latest or args.model_version is not None else (args.label or "stable")
    target = Target(args.server, args.model_name, args.model_version, label, args.timeout,
                    tls=args.tls, ca_cert=Path(args.ca_cert) if args.ca_cert else None)
    if by_default and not knows_label(target):
        print(f"mnist predict: {target.address} has no 'stable' label for {target.model_name}; asking for the "
              "newest version it serves", file=sys.stderr)
        target = replace(target, label=None)
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
    for result, label in zip(results, labels or []):  # the true digits, when the inputs are MNIST's
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
        request = f"  request {result['request_id']}" + (f" --index {result['index']}" if result["index"] else "") \
            if "request_id" in result else ""
        print(f"{result['input']}: {result['digit']} ({result['confidence']:.3f}){truth}  top3 {top3}  "
              f"[v{result['version']}]{request}")


def command_up(args: argparse.Namespace) -> int:
    """The serving stack until Ctrl-C or SIGTERM: addresses and export lines first."""
    from serving.stack import StackError, StackPorts, running_stack, serving_stack
    from storage.embedded import store_environment

    state_dir = pipeline_settings().state_dir
    if running_stack(state_dir):
        raise CliError(f"a serving stack already runs (see {state_dir / 'serving' / 'stack.json'}); "
                       "stop it first (Ctrl-C in its terminal)")
    ports = StackPorts(args.port, args.rest_api_port, args.server_port, args.server_rest_port)
    wait_for_stop = stop_on_signals()
    try:
        with store_environment(state_dir) as endpoint, \
                serving_stack(state_dir, ports, args.log_sample_rate, supervise=True,
                              say=lambda line: print(line, flush=True)) as (stack, _):
            print_stack(stack, endpoint)
            wait_for_stop()
            print("mnist up: stopping (the gateway writes its queued logs first)", flush=True)
    except StackError as error:
        raise CliError(str(error)) from None
    print("mnist up: stopped", flush=True)
    return 0


def print_stack(stack, endpoint: str | None) -> None:
    print(f"serving stack up (logs in {stack.logs}):")
    print(f"  gateway      gRPC {stack.gateway}   REST http://{stack.gateway_rest}   <- clients call this")
    print(f"  model server gRPC {stack.server}   REST http://{stack.server_rest}   (metrics at "
          f"/monitoring/prometheus/metrics)")
    print(f"  sync sidecar from {endpoint} into {stack.model_dir}")
    print(f"  feedback     POST http://{stack.gateway_rest}/v1/models/mnist/feedback with a bearer token from "
          f"{Path(stack.logs) / 'feedback-tokens'} (add untrusted callers there)")
    print("use it from another shell with:")
    print(f"  export MNIST_SERVING_ADDRESS={stack.gateway}")
    for name, value in environment_values(("MNIST_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_REGION")).items():
        print(f"  export {name}={value}")
    print("then: mnist predict --mnist-test 0:5, mnist check --server " + stack.server +
          ", or train (make worker and mnist train live-check what they publish here). Ctrl-C stops it.",
          flush=True)


def add_serving_parsers(commands: argparse._SubParsersAction) -> None:
    up = commands.add_parser(
        "up", help="keep the local serving stack running: model server, sync sidecar, logging gateway",
        description="The serving stack as production runs it, on the embedded store (or MNIST_S3_ENDPOINT): "
                    "the model server (gRPC, REST, metrics), the sync sidecar and the logging gateway clients "
                    "call. Prints the addresses and export lines; Ctrl-C or SIGTERM stops it cleanly. While it "
                    "runs, make worker and mnist train live-check what they publish against it.")
    up.add_argument("--port", type=int, default=8500, help="the gateway's gRPC port, where clients call "
                                                             "(default 8500, as TF Serving's; 0 picks a free one)")
    up.add_argument("--rest-api-port", type=int, default=8501, help="the gateway's REST port (default 8501)")
    up.add_argument("--server-port", type=int, default=0, help="the model server's own gRPC port (default: free)")
    up.add_argument("--server-rest-port", type=int, default=0, help="the model server's REST port (default: free)")
    up.add_argument("--log-sample-rate", type=float, default=1.0, help="fraction of Predict calls logged (default 1)")
    up.set_defaults(handler=command_up)
    add_serve_parser(commands)

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
    predict.add_argument("--server", default=default_server(),
                         help="HOST:PORT (default: MNIST_SERVING_ADDRESS or localhost:8500)")
    predict.add_argument("--model-name", default="mnist")
    choice = predict.add_mutually_exclusive_group()
    choice.add_argument("--model-version", type=int, help="ask for this version")
    choice.add_argument("--label", help="ask for the version with this label (default: stable)")
    choice.add_argument("--latest", action="store_true",
                        help="name no version or label: the server's answer to such clients (TF Serving's newest)")
    predict.add_argument("--mnist-test", metavar="START:STOP",
                         help="slice of the MNIST test set (MNIST_DATA_DIR, or ../shared/datasets/mnist "
                                                                   "beside the checkout)")
    predict.add_argument("--show-model", action="store_true", help="print the served version and its lineage")
    predict.add_argument("--json", action="store_true", help="one JSON list: input, digit, confidence, top3")
    predict.add_argument("--timeout", type=float, default=10.0, help="deadline per call in seconds (default 10)")
    predict.add_argument("--tls", action="store_true", help="use TLS")
    predict.add_argument("--ca-cert", help="CA certificate (PEM) to trust with --tls")
    predict.set_defaults(handler=command_predict)
