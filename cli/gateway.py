"""``mnist gateway``: the logging gateway in front of TF Serving, as a process of its own."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cli.common import (
    CliError,
    add_rest_limit_flags,
    reachable_store,
    rest_limits,
    stop_on_signals,
    traffic_stores,
)
from storage.settings import GatewaySettings

if TYPE_CHECKING:
    from serving.gateway.server import Gateway

GATEWAY_SWITCH_SECONDS = 0.0005  # see command_gateway
LOG_RETRY_SECONDS = 5.0  # a down store costs logs, not waiting: the writer gives up on a batch soon


def feedback_credentials(path: str | None) -> list:
    """The callers of --feedback-tokens (or MNIST_FEEDBACK_TOKENS); none: the gateway takes no feedback."""
    from serving.gateway.callers import CallerFileError, read_token_file

    if not path:
        return []
    try:
        return read_token_file(Path(path))
    except CallerFileError as error:
        raise CliError(f"--feedback-tokens {error}", exit_code=2) from None


def reload_tokens_on_sighup(gateway: "Gateway") -> None:
    """SIGHUP reads --feedback-tokens again (as a change to the file does by itself), in a thread:
    the handler must not wait for a request that holds the file's lock."""
    import signal
    import threading

    signal.signal(signal.SIGHUP, lambda signum, frame: threading.Thread(
        target=gateway.authenticator.reload, kwargs={"force": True}, daemon=True).start())


def command_gateway(args: argparse.Namespace) -> int:
    import logging

    from serving.gateway.server import Gateway, GatewayOptions

    # The relay's thread waits for the interpreter while another thread holds it (the log writer:
    # boto3 building and signing an upload); Python hands it over every switch interval, 5 ms by
    # default. At 0.5 ms the p50 the gateway adds fell from 0.37-0.72 to 0.32-0.46 ms (make bench).
    sys.setswitchinterval(GATEWAY_SWITCH_SECONDS)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)  # not a line per credential lookup
    if not 0.0 <= args.log_sample_rate <= 1.0:
        raise CliError(f"--log-sample-rate {args.log_sample_rate}: must be within 0-1", exit_code=2)
    for flag, value in (("--log-queue-size", args.log_queue_size), ("--log-queue-mib", args.log_queue_mib)):
        if value < 1:
            raise CliError(f"{flag} {value}: must be at least 1", exit_code=2)
    if args.rest_max_body_mib < 1:
        raise CliError(f"--rest-max-body-mib {args.rest_max_body_mib}: must be at least 1", exit_code=2)
    if args.feedback_per_minute <= 0:
        raise CliError(f"--feedback-per-minute {args.feedback_per_minute:g}: must be above 0", exit_code=2)
    limits = rest_limits(args, args.rest_api_num_threads)
    from storage.live_check import live_check_key

    credentials = feedback_credentials(args.feedback_tokens)
    if args.log_spool_mib < 1:
        raise CliError(f"--log-spool-mib {args.log_spool_mib}: must be at least 1", exit_code=2)
    spool = spool_directory(args.log_spool)
    with reachable_store(lambda: traffic_stores(LOG_RETRY_SECONDS)) as (logs, feedback):
        options = GatewayOptions(upstream=args.upstream, upstream_rest=args.upstream_rest, port=args.port,
                                 rest_port=args.rest_api_port, host=args.host, model_name=logs.settings.model_name,
                                 sample_rate=args.log_sample_rate, batch_records=args.log_batch_records,
                                 flush_seconds=args.log_flush_seconds, queue_size=args.log_queue_size,
                                 queue_bytes=args.log_queue_mib << 20, credentials=tuple(credentials),
                                 tokens_file=Path(args.feedback_tokens) if args.feedback_tokens else None,
                                 ledger=Path(args.log_ledger) if args.log_ledger else None,
                                 spool=spool, spool_bytes=args.log_spool_mib << 20,
                                 feedback_per_minute=args.feedback_per_minute,
                                 rest_max_body_bytes=args.rest_max_body_mib << 20,
                                 rest_limits=limits,
                                 live_check_key=live_check_key(logs.settings))
        try:
            gateway = Gateway(options, logs, feedback).start()
        except (RuntimeError, OSError) as error:
            raise CliError(f"cannot start the gateway: {error}") from None
        rest = f", REST on {args.host}:{gateway.rest.port}" if gateway.rest else ""
        wait_for_stop = stop_on_signals()  # before the line a supervisor may answer with SIGTERM at once
        reload_tokens_on_sighup(gateway)
        print(f"mnist gateway: listening on {args.host}:{gateway.port}{rest}, forwarding to {args.upstream}"
              f"{' (REST ' + args.upstream_rest + ')' if args.upstream_rest else ''}; logging "
              f"{args.log_sample_rate:.0%} of {options.model_name}'s Predict calls to {logs.uri()}", flush=True)
        wait_for_stop()
        gateway.stop(args.drain_seconds)
        waiting = gateway.logger.spool
        left = f", {waiting.depth} batches left in the spool {waiting.directory}" if waiting and waiting.depth else ""
        print(f"mnist gateway: stopped; {gateway.logger.written_records} records written{left}", flush=True)
    return 0


def spool_directory(given: str | None) -> Path | None:
    """--log-spool (or MNIST_GATEWAY_SPOOL): refused in one line when it cannot be used; "" turns the
    spool off. Unset: ``<state dir>/gateway/log-spool``, or no spool, said so, when that cannot be made."""
    from cli.common import pipeline_settings

    if given == "":
        return None
    path = Path(given) if given else pipeline_settings().state_dir / "gateway" / "log-spool"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as error:
        if given:
            raise CliError(f"--log-spool {path}: cannot use it ({error})", exit_code=2) from None
        print(f"mnist gateway: no log spool ({path}: {error}); a store outage drops logs", file=sys.stderr)
        return None
    return path


def add_gateway_parser(commands: argparse._SubParsersAction) -> None:
    files = GatewaySettings()
    gateway = commands.add_parser(
        "gateway", help="the logging gateway in front of TF Serving: request ids, sampled logs, feedback, metrics",
        description="A sidecar in front of TF Serving (gRPC and REST): passes every call through, gives each "
                    "Predict a request id, logs a sampled fraction as PredictionLog records to the store without "
                    "ever blocking a request, takes feedback, and serves Prometheus metrics and readiness.")
    gateway.add_argument("--upstream", required=True, help="HOST:PORT of TF Serving's gRPC API")
    gateway.add_argument("--upstream-rest", help="HOST:PORT of TF Serving's REST API (for REST pass-through)")
    gateway.add_argument("--port", type=int, default=8500, help="gRPC port; 0 picks a free one (default 8500)")
    gateway.add_argument("--rest-api-port", type=int, default=0,
                         help="REST port: TF Serving's REST API passed through, feedback, metrics, readiness; 0 = off")
    gateway.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    gateway.add_argument("--log-sample-rate", type=float, default=1.0,
                         help="fraction of Predict calls logged, 0-1 (default 1: every call; lower it for heavy "
                              "traffic)")
    gateway.add_argument("--log-batch-records", type=int, default=256, help="records per log object (default 256)")
    gateway.add_argument("--log-flush-seconds", type=float, default=5.0,
                         help="longest a logged call waits before its batch is written (default 5)")
    gateway.add_argument("--log-queue-size", type=int, default=10_000,
                         help="calls waiting to be written before new ones are dropped (default 10000)")
    gateway.add_argument("--log-queue-mib", type=int, default=256,
                         help="MiB of messages waiting to be written before new ones are dropped: keep it well "
                              "under the gateway's memory limit (default 256)")
    gateway.add_argument("--log-ledger", metavar="FILE", default=files.gateway_ledger,
                         help="keep the count of queued, unwritten logs here (every 0.5 s), so the next start reports "
                              "what a kill lost (default: MNIST_GATEWAY_LEDGER; none: not kept)")
    gateway.add_argument("--log-spool", metavar="DIR", default=files.gateway_spool,
                         help="where log batches the store does not take wait on disk until it does, written "
                              "oldest first once it is back (default: MNIST_GATEWAY_SPOOL, else "
                              "<state dir>/gateway/log-spool; '' turns it off: an outage drops logs)")
    gateway.add_argument("--log-spool-mib", type=int, default=1024,
                         help="MiB the spool may hold before further batches are dropped (default 1024)")
    gateway.add_argument("--feedback-tokens", metavar="FILE", default=files.feedback_tokens,
                         help="who may send feedback: 'NAME TOKEN [trusted]' a line (default: MNIST_FEEDBACK_TOKENS; "
                              "none: feedback is refused with 401)")
    gateway.add_argument("--rest-max-body-mib", type=int, default=16,
                         help="largest REST body, as sent and after gzip (413 past it; default 16, as mnist serve)")
    gateway.add_argument("--rest-api-num-threads", type=int, default=4 * (os.cpu_count() or 1),
                         help="threads answering REST calls at once (each relays one upstream); connections wait "
                              "on an event loop, not a thread (default 4 x CPUs, as mnist serve)")
    add_rest_limit_flags(gateway)
    gateway.add_argument("--feedback-per-minute", type=float, default=60.0,
                         help="feedback requests a minute per caller before 429 (default 60)")
    gateway.add_argument("--drain-seconds", type=float, default=10.0,
                         help="on SIGTERM, how long queued logs may take to be written (default 10)")
    gateway.set_defaults(handler=command_gateway)
