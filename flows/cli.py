"""The ``mnist`` command: one entry point with subcommands, argparse throughout."""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist", description=(
        "Train, gate, publish and serve an MNIST digit classifier (Prefect, Keras, TF Serving)."))
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show TensorFlow's C++ start-up lines (oneDNN, CUDA, CPU features), hidden otherwise")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Command groups live in their own modules and build on the shared helpers above.
    from flows.cli_data import add_data_parser
    from flows.cli_deploy import add_scheduling_parsers
    from flows.cli_monitoring import add_monitoring_parsers
    from flows.cli_serving import add_serving_parsers
    from flows.cli_store import add_registry_parser, add_storage_parser
    from flows.cli_training import add_training_parsers

    add_training_parsers(commands)
    add_storage_parser(commands)
    add_registry_parser(commands)
    add_data_parser(commands)
    add_serving_parsers(commands)
    add_monitoring_parsers(commands)
    add_scheduling_parsers(commands)
    return parser


def stop_on_signals() -> Callable[[], None]:
    """From now on SIGTERM and SIGINT end a long-running command's wait rather than the command;
    returns that wait (it returns once either arrives, even if it arrived first).

    The handler only puts on a SimpleQueue, whose put is reentrant. An Event's set() in a handler
    can deadlock: the handler runs in the main thread, which may hold that Event's lock inside
    wait() when the signal lands (python/cpython#126434)."""
    import queue
    import signal

    received: queue.SimpleQueue[int] = queue.SimpleQueue()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda signum, frame: received.put(signum))

    def wait() -> None:
        received.get()

    return wait


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
