"""``mnist serve``: the local model server, on ``tensorflow_model_server``'s command line (its
flags as that binary spells them; ``serving/model_server/flags.py`` holds the parsing they share)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from cli.common import CliError, add_rest_limit_flags, rest_limits, stop_on_signals
from serving.model_server.flags import (
    CPUS,
    add_foreign_flags,
    foreign_flag_notes,
    grpc_channel_arguments,
    tf_serving_bool,
    tf_serving_spellings,
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
    if args.max_images_per_request < 0 or args.rest_max_body_mib < 1:
        raise CliError("--max-images-per-request must be 0 or more and --rest-max-body-mib 1 or more", exit_code=2)
    limits = rest_limits(args, args.rest_api_num_threads)
    without_keras_at_tensorflow_import()
    from serving.model_server.inference import PredictOptions
    from serving.model_server.manager import ModelManager
    from serving.model_server.model_config import ConfigRefused, read_model_config_file, single_model_config
    from serving.model_server.server import ModelServer, ServerOptions

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
                            rest_max_body_bytes=args.rest_max_body_mib << 20,
                            ssl_config_file=Path(args.ssl_config_file) if args.ssl_config_file else None,
                            workers=args.grpc_max_threads, socket_path=args.grpc_socket_path,
                            channel_arguments=args.grpc_channel_arguments,
                            health_check=args.enable_grpc_healthcheck_service,
                            cors=args.rest_api_enable_cors_support,
                            rest_limits=limits,
                            predict=PredictOptions(args.enable_serialization_as_tensor_content,
                                                   args.reject_non_finite_inputs,
                                                   args.enable_signature_method_name_check,
                                                   args.max_images_per_request),
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
    from serving.model_server.manager import LoadOptions, LoadRetries

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

    from serving.model_server.batching import read_batching_parameters

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
    from serving.protocol.monitoring import metrics_path

    if not args.monitoring_config_file:
        return None
    if not args.rest_api_port:
        raise CliError("--monitoring-config-file needs --rest-api-port: metrics are served on the REST port, "
                       "as TF Serving serves them", exit_code=2)
    try:
        return metrics_path(Path(args.monitoring_config_file))
    except ValueError as error:
        raise CliError(str(error), exit_code=2) from None


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="serve SavedModels over TF Serving's gRPC API",
                                description="A TF-Serving-compatible gRPC server (PredictionService, ModelService). "
                                            "It takes tensorflow_model_server's flags as that binary spells them "
                                            "(--rest_api_port=8501, --enable_batching=true), so production's "
                                            "command line runs here unchanged.")
    serve.add_argument("--port", type=int, default=8500, help="gRPC port; 0 picks a free one (default 8500)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument(*tf_serving_spellings("rest_api_port"), type=int, default=0,
                       help="TF Serving's REST API (/v1/models/NAME[:predict]) on this port; 0 = off (default)")
    serve.add_argument(*tf_serving_spellings("rest_api_num_threads"), type=int, default=4 * CPUS,
                       help=f"threads answering REST calls at once; connections wait on an event loop, not a "
                            f"thread (default 4 x CPUs = {4 * CPUS}, as TF Serving)")
    add_rest_limit_flags(serve)
    serve.add_argument(*tf_serving_spellings("model_base_path"), help="the model's directory of numbered versions")
    serve.add_argument(*tf_serving_spellings("model_name"), default="mnist", help="model name (default mnist)")
    serve.add_argument(*tf_serving_spellings("model_config_file"),
                       help="TF Serving models.config (text ModelServerConfig)")
    serve.add_argument(*tf_serving_spellings("model_config_file_poll_wait_seconds"), type=float,
                       default=0.0, help="re-read --model-config-file this often; 0 reads it once, at start "
                                         "(default 0, as TF Serving)")
    serve.add_argument(*tf_serving_spellings("file_system_poll_wait_seconds"), type=float, default=1.0,
                       help="how often to look for new versions; 0 looks once, at start (default 1, as TF Serving)")
    serve.add_argument(*tf_serving_spellings("enable_batching"), **tf_serving_bool(False),
                       help="merge concurrent requests into batches, as TF Serving's flag of the same name")
    serve.add_argument(*tf_serving_spellings("batching_parameters_file"),
                       help="TF Serving BatchingParameters text proto (max_batch_size, batch_timeout_micros, "
                            "num_batch_threads, max_enqueued_batches, allowed_batch_sizes); default: TF Serving's")
    serve.add_argument(*tf_serving_spellings("grpc_socket_path"), default="",
                       help="also answer gRPC on this UNIX socket, as TF Serving's flag")
    serve.add_argument(*tf_serving_spellings("grpc_channel_arguments"), type=grpc_channel_arguments,
                       default=[], help="gRPC server arguments, key=value,... (ints as ints), as TF Serving's flag")
    serve.add_argument(*tf_serving_spellings("grpc_max_threads"), type=int, default=4 * CPUS,
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
    serve.add_argument(*tf_serving_spellings("max_num_load_retries"), type=int, default=5,
                       help="retries of a load that failed, before its version is END with the error "
                            "(default 5, as TF Serving)")
    serve.add_argument(*tf_serving_spellings("load_retry_interval_micros"), type=int, default=60_000_000,
                       help="wait between load retries; negative: none (default 60000000, as TF Serving)")
    serve.add_argument(*tf_serving_spellings("enable_model_warmup"), **tf_serving_bool(True),
                       help="replay assets.extra/tf_serving_warmup_requests on load (default true, as TF Serving)")
    serve.add_argument(*tf_serving_spellings("monitoring_config_file"),
                       help="TF Serving MonitoringConfig text proto: Prometheus metrics on the REST port at its path")
    serve.add_argument(*tf_serving_spellings("ssl_config_file"),
                       help="TF Serving SSLConfig text proto: server_key, server_cert, custom_ca")
    for scope in ("session", "intra_op", "inter_op"):
        serve.add_argument(*tf_serving_spellings(f"tensorflow_{scope}_parallelism"), type=int, default=0,
                           help=f"TensorFlow's {scope.replace('_', '-')} threads, as TF Serving's flag "
                                "(default 0: TensorFlow decides)")
    serve.add_argument("--max-message-bytes", type=int, default=64 << 20,
                       help="largest request or response (default 64 MiB; a batch of 1024 images is 3.2 MB)")
    serve.add_argument(*tf_serving_spellings("allow_version_labels_for_unavailable_models"),
                       **tf_serving_bool(False),
                       help="accept a new label on a version still loading (a label in use still moves only to "
                            "an AVAILABLE version), as TF Serving's flag of the same name")
    serve.add_argument(*tf_serving_spellings("enable_serialization_as_tensor_content"),
                       **tf_serving_bool(False),
                       help="answer Predict in packed tensor_content instead of float_val, as TF Serving's flag")
    serve.add_argument("--max-images-per-request", type=int, default=4096,
                       help="refuse (INVALID_ARGUMENT, REST 400) a Predict whose inputs declare more rows, before "
                            "decoding it (default 4096; 0: no limit, as TF Serving)")
    serve.add_argument("--rest-max-body-mib", type=int, default=16,
                       help="largest REST body, as sent and after gzip (413 past it; default 16: JSON costs about "
                            "60 times its size to parse)")
    serve.add_argument("--reject-non-finite-inputs", action="store_true",
                       help="refuse inputs holding NaN or infinity (TF Serving runs them through; off by default)")
    serve.set_defaults(handler=command_serve)
