"""The ``mnist`` command: one entry point with subcommands, argparse throughout."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

# TensorFlow's C++ start-up chatter is noise on a command line.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The beat the zombie-run automation expects (flows/deploy.py HEARTBEAT_SECONDS), for runs a command
# starts against a server; a deployment's runs have it from their job variables.
os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")

from cli.common import CliError  # noqa: E402  (after the environment defaults above)
from flows.prefect_api import project_prefect_home  # noqa: E402  (no Prefect import: set before Prefect reads it)
from storage.errors import MnistError  # noqa: E402
from storage.settings import StateSettings  # noqa: E402

# MNIST_STATE_DIR read here, not through PipelineSettings: Prefect reads PREFECT_HOME when it is
# first imported, which may be before any command asks for the settings.
project_prefect_home(StateSettings().state_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist", description=(
        "Train, gate, publish and serve an MNIST digit classifier (Prefect, Keras, TF Serving)."))
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show TensorFlow's C++ start-up lines (oneDNN, CUDA, CPU features), hidden otherwise")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Command groups live in their own modules and build on the shared helpers above.
    from cli.data import add_data_parser
    from cli.deploy import add_scheduling_parsers
    from cli.gateway import add_gateway_parser
    from cli.monitoring import add_monitoring_parsers
    from cli.serving import add_serving_parsers
    from cli.store import add_registry_parser, add_storage_parser
    from cli.training import add_training_parsers

    add_training_parsers(commands)
    add_storage_parser(commands)
    add_registry_parser(commands)
    add_data_parser(commands)
    add_serving_parsers(commands)
    add_gateway_parser(commands)
    add_monitoring_parsers(commands)
    add_scheduling_parsers(commands)
    return parser


def exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM ends the command like Ctrl-C does, so cleanup (stopping an embedded
    store, a server, a worker) runs instead of being skipped."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    import signal

    from storage.embedded import die_with_parent

    signal.signal(signal.SIGTERM, exit_on_sigterm)
    die_with_parent()  # a part of a stack: gone with the process that keeps the stack
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    else:
        from cli.native_logs import hold_back_native_logs

        hold_back_native_logs()
    try:
        return args.handler(args)
    except MnistError as error:  # the family's message is one line; a CliError says its exit code
        print(f"mnist {args.command}: {error}", file=sys.stderr)
        return error.exit_code if isinstance(error, CliError) else 1
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


def run(argv: list[str] | None = None) -> None:
    """The ``mnist`` command's entry point: main(), then a quick exit with its code."""
    import atexit

    outcome = {"code": 1}  # an uncaught exception's: Python prints it before exit handlers run
    atexit.register(exit_skipping_teardown, outcome)
    try:
        outcome["code"] = main(argv)
    except SystemExit as stop:  # argparse's usage errors; a message (str) exits 1
        outcome["code"] = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        raise
    sys.exit(outcome["code"])


def tensorflow_model_server() -> None:
    """``tensorflow_model_server ARGS``: ``mnist serve ARGS`` under TF Serving's own name, so launch
    scripts and TF Serving's test harness that start that binary run unchanged."""
    run(["serve", *sys.argv[1:]])
