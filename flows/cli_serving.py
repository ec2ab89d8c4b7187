"""``mnist serve``, ``mnist sync`` and ``mnist predict``: what runs beside the model server, and its client."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from flows.cli import CliError, pipeline_settings, print_json, reachable_store, stop_on_signals
from flows.tf_serving_flags import (
    CPUS, add_foreign_flags, foreign_flag_notes, grpc_channel_arguments, tf_serving_bool, tf_serving_spellings,
)


def without_keras_at_tensorflow_import() -> None:
    """TensorFlow imports all of Keras (and with it matplotlib) as it is imported, for Keras
    optimizers a SavedModel might name: a second of a model server's start. A model server never
    runs Keras (TF Serving has none; a SavedModel that needed it would fail there too). With
    TF_USE_LEGACY_KERAS set and tf_keras not installed, TensorFlow skips that import."""
    if "tensorflow" not in sys.modules and importlib.util.find_spec("tf_keras") is None:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


def command_serve(args: argparse.Namespace) -> int:
    import logging

    if args.version:
        return print_version()
    without_keras_at_tensorflow_import()
    from serving.inference import PredictOptions
    from serving.manager import ModelManager
    from serving.model_config import ConfigRefused, read_model_config_file, single_model_config
    from serving.server import ModelServer, ServerOptions

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        for note in foreign_flag_notes(args):
            logging.getLogger("mnist.serve").info(note)
    except ValueError as error:
        raise CliError(str(error), exit_code=2) from None
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
                            config_poll_seconds=args.model_config_file_poll_wait_seconds,
                            max_message_bytes=args.max_message_bytes, rest_api_port=args.rest_api_port,
                            ssl_config_file=Path(args.ssl_config_file) if args.ssl_config_file else None,
                            workers=args.grpc_max_threads, socket_path=args.grpc_socket_path,
                            channel_arguments=args.grpc_channel_arguments,
                            health_check=args.enable_grpc_healthcheck_service,
                            cors=args.rest_api_enable_cors_support,
                            predict=PredictOptions(args.enable_serialization_as_tensor_content,
                                                   args.reject_non_finite_inputs,
                                                   args.enable_signature_method_name_check),
                            metrics_path=monitoring_path(args))
    loading = load_options(args)
    use_tensorflow_threads(args)  # the last check: it logs what it set
    try:
        manager = ModelManager(config, args.allow_version_labels_for_unavailable_models, loading)
        server = ModelServer(manager, options, Path(args.model_config_file) if args.model_config_file else None).start()
    except ConfigRefused as refusal:
        raise CliError(f"config refused: {refusal}", exit_code=2) from None
    except (ValueError, RuntimeError, OSError) as error:
        raise CliError(f"cannot start the server: {error}") from None
    served = {name: sorted(model.versions) for name, model in server.manager.models.items()}
    rest = f", REST on {args.host}:{server.rest.port}" if server.rest else ""
    wait_for_stop = stop_on_signals()  # before the line a supervisor may answer with SIGTERM at once
    print(f"mnist serve: listening on {args.host}:{server.port}{rest}, serving {served}", flush=True)
    wait_for_stop()
    server.stop()
    return 0


def load_options(args: argparse.Namespace):
    """How versions load: --saved_model_tags, warmup (--num_request_iterations_for_warmup: 0 is
    TF Serving's "unset", one replay), batching, and --max_num_load_retries with
    --load_retry_interval_micros (a negative interval: no wait, as retrier.cc)."""
    from serving.manager import LoadOptions, LoadRetries

    if args.max_num_load_retries < 0:
        raise CliError(f"--max_num_load_retries must be 0 or more, not {args.max_num_load_retries}", exit_code=2)
    if args.num_request_iterations_for_warmup < 0:
        raise CliError("--num_request_iterations_for_warmup must be 0 or more, not "
                       f"{args.num_request_iterations_for_warmup}", exit_code=2)
    tags = frozenset(tag.strip() for tag in args.saved_model_tags.split(",") if tag.strip())
    if not tags:
        raise CliError("--saved_model_tags names no tag", exit_code=2)
    iterations = max(1, args.num_request_iterations_for_warmup) if args.enable_model_warmup else 0
    retries = LoadRetries(args.max_num_load_retries, max(0, args.load_retry_interval_micros) / 1e6)
    return LoadOptions(tags, iterations, batching_options(args), retries)


def print_version() -> int:
    """``--version``, in TF Serving's two lines (main.cc), without starting TensorFlow."""
    from importlib.metadata import version

    print(f"TensorFlow ModelServer: mnist serve (tensorflow-serving-api {version('tensorflow-serving-api')})\n"
          f"TensorFlow Library: {version('tensorflow')}")
    return 0


def use_tensorflow_threads(args: argparse.Namespace) -> None:
    """TF Serving's --tensorflow_{session,intra_op,inter_op}_parallelism, with its rules (server.cc):
    all three at once is refused; intra- or inter-op set wins over session; 0 lets TensorFlow decide.
    Before any model loads: TensorFlow fixes its thread pools at its first op."""
    import logging

    import tensorflow as tf

    intra, inter, session = (args.tensorflow_intra_op_parallelism, args.tensorflow_inter_op_parallelism,
                             args.tensorflow_session_parallelism)
    if intra > 0 and inter > 0 and session > 0:
        raise CliError("give --tensorflow_session_parallelism or (--tensorflow_intra_op_parallelism, "
                       "--tensorflow_inter_op_parallelism), not all three (as TF Serving)", exit_code=2)
    if intra <= 0 and inter <= 0:
        intra = inter = session
    tf.config.threading.set_intra_op_parallelism_threads(max(intra, 0))
    tf.config.threading.set_inter_op_parallelism_threads(max(inter, 0))
    logging.getLogger("mnist.serve").info(
        "TensorFlow threads: intra-op %d, inter-op %d (0: TensorFlow decides)",
        tf.config.threading.get_intra_op_parallelism_threads(), tf.config.threading.get_inter_op_parallelism_threads())


def batching_options(args: argparse.Namespace):
    """--enable-batching with TF Serving's BatchingParameters file (or its defaults); None when off."""
    import sys

    from serving.batching import read_batching_parameters

    if not args.enable_batching:
        if args.batching_parameters_file:
            print("mnist serve: --batching-parameters-file has no effect without --enable-batching (as in TF Serving)",
                  file=sys.stderr)
        return None
    try:
        return read_batching_parameters(Path(args.batching_parameters_file) if args.batching_parameters_file else None)
    except ValueError as error:
        raise CliError(str(error), exit_code=2) from None


def monitoring_path(args: argparse.Namespace) -> str | None:
    """The Prometheus path from ``--monitoring-config-file``, served on the REST port as TF Serving does."""
    from serving.monitoring import metrics_path

    if not args.monitoring_config_file:
        return None
    if not args.rest_api_port:
        raise CliError("--monitoring-config-file needs --rest-api-port: metrics are served on the REST port, "
                       "as TF Serving serves them", exit_code=2)
    try:
        return metrics_path(Path(args.monitoring_config_file))
    except ValueError as error:
        raise CliError(str(error), exit_code=2) from None


def command_sync(args: argparse.Namespace) -> int:
    from mnist_client.client import Target
    from serving.sync import SyncError, sync_once, watch
    from storage.signing import SigningSettings

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
        raise CliError("--mnist-test needs the MNIST files: set MNIST_DATA_DIR to the folder of the four IDX files "
                       "(make and mnist find ../shared/datasets/mnist beside the checkout by themselves)", exit_code=2)
    try:
        test, _ = read_split(data_dir, "t10k", MNIST_SHA256)
    except DataError as error:
        raise CliError(str(error)) from None
    labels = [int(label) for label in test.labels[start:stop]]
    return [f"mnist-test[{i}]" for i in range(start, stop)], to_model_input(test.images[start:stop]), labels


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


def command_predict(args: argparse.Namespace) -> int:
    from mnist_client.client import ServingError, Target, predict
    from mnist_client.images import InputError, read_inputs

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
                serving_stack(state_dir, ports, args.log_sample_rate) as (stack, _):
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
    print("use it from another shell with:")
    print(f"  export MNIST_SERVING_ADDRESS={stack.gateway}")
    for name in ("MNIST_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        if os.environ.get(name):
            print(f"  export {name}={os.environ[name]}")
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

    serve = commands.add_parser("serve", help="serve SavedModels over TF Serving's gRPC API",
                                description="A TF-Serving-compatible gRPC server (PredictionService, ModelService). "
                                            "It takes tensorflow_model_server's flags as that binary spells them "
                                            "(--rest_api_port=8501, --enable_batching=true), so production's "
                                            "command line runs here unchanged.")
    serve.add_argument("--port", type=int, default=8500, help="gRPC port; 0 picks a free one (default 8500)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--rest-api-port", "--rest_api_port", type=int, default=0,
                       help="TF Serving's REST API (/v1/models/NAME[:predict]) on this port; 0 = off (default)")
    serve.add_argument("--model-base-path", "--model_base_path", help="the model's directory of numbered versions")
    serve.add_argument("--model-name", "--model_name", default="mnist", help="model name (default mnist)")
    serve.add_argument("--model-config-file", "--model_config_file",
                       help="TF Serving models.config (text ModelServerConfig)")
    serve.add_argument("--model-config-file-poll-wait-seconds", "--model_config_file_poll_wait_seconds", type=float,
                       default=0.0, help="re-read --model-config-file this often; 0 reads it once, at start "
                                         "(default 0, as TF Serving)")
    serve.add_argument("--file-system-poll-wait-seconds", "--file_system_poll_wait_seconds", type=float, default=1.0,
                       help="how often to look for new versions; 0 looks once, at start (default 1, as TF Serving)")
    serve.add_argument("--enable-batching", "--enable_batching", **tf_serving_bool(False),
                       help="merge concurrent requests into batches, as TF Serving's flag of the same name")
    serve.add_argument("--batching-parameters-file", "--batching_parameters_file",
                       help="TF Serving BatchingParameters text proto (max_batch_size, batch_timeout_micros, "
                            "num_batch_threads, max_enqueued_batches, allowed_batch_sizes); default: TF Serving's")
    serve.add_argument("--grpc-socket-path", "--grpc_socket_path", default="",
                       help="also answer gRPC on this UNIX socket, as TF Serving's flag")
    serve.add_argument("--grpc-channel-arguments", "--grpc_channel_arguments", type=grpc_channel_arguments,
                       default=[], help="gRPC server arguments, key=value,... (ints as ints), as TF Serving's flag")
    serve.add_argument("--grpc-max-threads", "--grpc_max_threads", type=int, default=4 * CPUS,
                       help=f"threads answering gRPC calls (default 4 x CPUs = {4 * CPUS}, as TF Serving)")
    serve.add_argument(*tf_serving_spellings("enable_grpc_healthcheck_service"), **tf_serving_bool(False),
                       help="grpc.health.v1.Health: SERVING for \"\", ModelService and PredictionService, "
                            "as TF Serving")
    serve.add_argument(*tf_serving_spellings("rest_api_enable_cors_support"), **tf_serving_bool(False),
                       help="CORS headers on REST API replies, as TF Serving")
    serve.add_argument(*tf_serving_spellings("enable_signature_method_name_check"), **tf_serving_bool(False),
                       help="refuse Predict on a signature whose method_name is not predict, classify or regress")
    serve.add_argument(*tf_serving_spellings("saved_model_tags"), default="serve",
                       help="tags of the MetaGraph to load, comma-separated (default serve)")
    serve.add_argument(*tf_serving_spellings("num_request_iterations_for_warmup"), type=int, default=0,
                       help="replays of each warmup request (default 0: once, as TF Serving)")
    serve.add_argument("--version", **tf_serving_bool(False), help="print the versions and exit, as TF Serving")
    add_foreign_flags(serve)
    serve.add_argument("--max-num-load-retries", "--max_num_load_retries", type=int, default=5,
                       help="retries of a load that failed, before its version is END with the error "
                            "(default 5, as TF Serving)")
    serve.add_argument("--load-retry-interval-micros", "--load_retry_interval_micros", type=int, default=60_000_000,
                       help="wait between load retries; negative: none (default 60000000, as TF Serving)")
    serve.add_argument("--enable-model-warmup", "--enable_model_warmup", **tf_serving_bool(True),
                       help="replay assets.extra/tf_serving_warmup_requests on load (default true, as TF Serving)")
    serve.add_argument("--monitoring-config-file", "--monitoring_config_file",
                       help="TF Serving MonitoringConfig text proto: Prometheus metrics on the REST port at its path")
    serve.add_argument("--ssl-config-file", "--ssl_config_file",
                       help="TF Serving SSLConfig text proto: server_key, server_cert, custom_ca")
    for scope in ("session", "intra_op", "inter_op"):
        serve.add_argument(f"--tensorflow-{scope.replace('_', '-')}-parallelism",
                           f"--tensorflow_{scope}_parallelism", type=int, default=0,
                           help=f"TensorFlow's {scope.replace('_', '-')} threads, as TF Serving's flag "
                                "(default 0: TensorFlow decides)")
    serve.add_argument("--max-message-bytes", type=int, default=64 << 20,
                       help="largest request or response (default 64 MiB; a batch of 1024 images is 3.2 MB)")
    serve.add_argument("--allow-version-labels-for-unavailable-models", "--allow_version_labels_for_unavailable_models",
                       **tf_serving_bool(False),
                       help="accept a new label on a version still loading (a label in use still moves only to "
                            "an AVAILABLE version), as TF Serving's flag of the same name")
    serve.add_argument("--enable-serialization-as-tensor-content", "--enable_serialization_as_tensor_content",
                       **tf_serving_bool(False),
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
    predict.add_argument("--mnist-test", metavar="START:STOP", help="slice of the MNIST test set (MNIST_DATA_DIR, or ../shared/datasets/mnist "
                                                                   "beside the checkout)")
    predict.add_argument("--show-model", action="store_true", help="print the served version and its lineage")
    predict.add_argument("--json", action="store_true", help="one JSON list: input, digit, confidence, top3")
    predict.add_argument("--timeout", type=float, default=10.0, help="deadline per call in seconds (default 10)")
    predict.add_argument("--tls", action="store_true", help="use TLS")
    predict.add_argument("--ca-cert", help="CA certificate (PEM) to trust with --tls")
    predict.set_defaults(handler=command_predict)
