"""What every ``mnist`` command group shares: one-line errors, flags from pydantic models,
store access with one-line errors, JSON output, waiting for a stop signal."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, get_args

from pydantic import BaseModel, ValidationError

from storage.errors import MnistError
from storage.settings import ServingSettings, retry_seconds_set


class CliError(MnistError):
    """A problem to report in one line, with a non-zero exit code."""

    status = "INVALID_ARGUMENT"

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def scalar_type(annotation: Any) -> Callable[[str], Any]:
    """``int | None`` -> int; Literal and plain str -> str (pydantic checks the value)."""
    for candidate in (int, float):
        if annotation is candidate or candidate in get_args(annotation):
            return candidate
    return str


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], skip: tuple[str, ...] = ()) -> None:
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


def given_flags(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in model.model_fields
            if getattr(args, name, None) is not None}


def pipeline_settings():
    from storage.settings import PipelineSettings

    return PipelineSettings()


def default_server() -> str:
    """``--server``'s default: MNIST_SERVING_ADDRESS, else TF Serving's usual gRPC port here."""
    try:
        return ServingSettings().serving_address or "localhost:8500"
    except ValidationError as error:
        raise CliError(validation_message(error), exit_code=2) from None


# An interactive read answers or fails within this, unless MNIST_RETRY_SECONDS says otherwise;
# a publish keeps the full retry window (its default is 60 s).
INTERACTIVE_RETRY_SECONDS = 10.0


def store_for_cli(settings_class: type, store_class: type, interactive: bool = True):
    """A store whose retries say so on stderr at once, and, for a person waiting, a short retry window."""
    try:
        settings = settings_class()
    except ValidationError as error:
        raise CliError(validation_message(error), exit_code=2) from None
    if interactive and not retry_seconds_set():
        settings = settings.model_copy(update={"retry_seconds": min(settings.retry_seconds,
                                                                    INTERACTIVE_RETRY_SECONDS)})
    store = store_class(settings)
    store.on_retry = lambda message: print(f"mnist: {message}", file=sys.stderr, flush=True)
    return store


def registry_store(interactive: bool = True):
    from storage.models import ModelStore
    from storage.settings import StoreSettings

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


def add_rest_limit_flags(parser: argparse.ArgumentParser) -> None:
    """What a REST client may hold of a front end (``serving/protocol/http.py``: ``HttpLimits``), the
    same flags on ``mnist serve`` and ``mnist gateway``; the thread count is each command's own."""
    parser.add_argument("--rest-header-timeout-seconds", type=float, default=10.0,
                        help="a request's head (line and headers) must arrive within this, from the connection's "
                             "start or the request's first byte; then 408 and closed (default 10)")
    parser.add_argument("--rest-body-timeout-seconds", type=float, default=60.0,
                        help="a request's body must arrive within this after its head; then 408 and closed "
                             "(default 60)")
    parser.add_argument("--rest-idle-timeout-seconds", type=float, default=30.0,
                        help="a kept-alive connection with no request is closed after this (default 30)")
    parser.add_argument("--rest-max-connections", type=int, default=4096,
                        help="REST connections open at once; one more is answered 503 and closed (default 4096)")


def rest_limits(args: argparse.Namespace, threads: int):
    """The flags of ``add_rest_limit_flags`` (and ``threads``) as HttpLimits; a bad one exits 2."""
    from serving.protocol.http import HttpLimits

    for flag in ("header", "body", "idle"):
        if not getattr(args, f"rest_{flag}_timeout_seconds") > 0:
            raise CliError(f"--rest-{flag}-timeout-seconds {getattr(args, f'rest_{flag}_timeout_seconds'):g}: "
                           "must be above 0", exit_code=2)
    for flag, count in (("--rest-max-connections", args.rest_max_connections), ("--rest-api-num-threads", threads)):
        if count < 1:
            raise CliError(f"{flag} {count}: must be at least 1", exit_code=2)
    return HttpLimits(args.rest_header_timeout_seconds, args.rest_body_timeout_seconds,
                      args.rest_idle_timeout_seconds, args.rest_max_connections, threads)


def traffic_stores(retry_seconds: float | None = None):
    """(prediction logs, feedback) of MNIST_MODEL_NAME in the configured (or embedded) bucket."""
    from storage.logs import FeedbackStore, PredictionLogStore
    from storage.settings import TrafficSettings

    logs = store_for_cli(TrafficSettings, PredictionLogStore, interactive=True)
    if retry_seconds is not None and not retry_seconds_set():
        logs.settings = logs.settings.model_copy(update={"retry_seconds": retry_seconds})
    return logs, FeedbackStore(logs.settings, logs.client)
