"""The ``mnist`` command: one entry point with subcommands, argparse throughout."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, get_args

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
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=scalar_type(field.annotation),
                            default=None, help=f"{field.description}{default}")


def validation_message(error: ValidationError) -> str:
    problems = [f"--{'.'.join(str(p) for p in item['loc']).replace('_', '-')}: {item['msg']}"
                for item in error.errors()]
    return "invalid settings: " + "; ".join(problems)


def given_flags(args: argparse.Namespace, model: type) -> dict[str, Any]:
    return {name: getattr(args, name) for name in model.model_fields
            if getattr(args, name, None) is not None}


def command_train(args: argparse.Namespace) -> int:
    from flows.params import TrainingParams

    values = given_flags(args, TrainingParams)
    if args.output:
        values["output_dir"] = args.output
    try:
        params = TrainingParams(**values)
        params.train_config()  # refuse a bad combination before any work starts
    except ValidationError as error:
        raise CliError(validation_message(error), exit_code=2) from None

    from flows.training import training_flow

    state = training_flow(params, return_state=True)
    if not state.is_completed():
        raise CliError(f"training run {state.name}: {state.message}")
    result = state.result()
    print(f"test accuracy: {result['test_accuracy']:.4f}")
    print(f"run outputs:   {result['run_dir']}")
    print(f"saved model:   {result['saved_model']} (version {result['version']})")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from flows.params import TrainingParams

    parser = argparse.ArgumentParser(prog="mnist", description=(
        "Train, gate, publish and serve an MNIST digit classifier (Prefect, Keras, TF Serving)."))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="run the training flow once",
                                description="Run the training flow: data, train, evaluate, gate, report, export.")
    add_model_flags(train, TrainingParams, skip=("output_dir",))
    train.add_argument("--output", metavar="DIR", default=None,
                       help="where plots, reports and the SavedModel go (default: MNIST_OUTPUT_DIR or ./outputs)")
    train.add_argument("--json", action="store_true", help="also print the flow result as JSON")
    train.set_defaults(handler=command_train)
    return parser


def main(argv: list[str] | None = None) -> int:
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
    sys.exit(main())
