"""``mnist train`` and ``mnist run``: the training flow, and the whole chain around it."""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import ValidationError

from cli.common import CliError, add_model_flags, given_flags, pipeline_settings, validation_message
from storage.settings import data_dir_set
from tasks.results import SkippedRun, TrainingResult


def print_training_result(result: TrainingResult | SkippedRun) -> None:
    if isinstance(result, SkippedRun):
        print(result.skipped)
        return
    print("gate:")
    for check in result.gate:
        print(f"  {check}")
    print(f"test accuracy: {result.test_accuracy:.4f}")
    if result.slices:
        stable = result.stable
        print(f"{'slice':<24} {'candidate':>9} {'stable' + (f' v{stable.version}' if stable else ''):>10}")
        rows = [("MNIST test", result.test_accuracy, stable.test_accuracy if stable else None)]
        rows += [(name, value, result.stable_slices.get(name)) for name, value in sorted(result.slices.items())]
        for name, mine, theirs in rows:
            print(f"{name:<24} {mine:>9.4f} {'-' if theirs is None else f'{theirs:.4f}':>10}")
    print(f"run outputs:   {result.run_dir}")
    print(f"saved model:   {result.saved_model}")
    if result.published:
        published = result.published
        print(f"published:     {published.uri} (version {published.version}, label {published.label})")


def command_train(args: argparse.Namespace) -> int:
    from flows.chain import TrainingRunFailed, run_training

    try:
        result = run_training(training_params(args))
    except TrainingRunFailed as error:
        raise CliError(str(error)) from None
    print_training_result(result)
    if args.json:
        print(result.model_dump_json(indent=2))
    return 0


def training_params(args: argparse.Namespace):
    from flows.params import TrainingParams

    values = given_flags(args, TrainingParams)
    if args.output:
        values["output_dir"] = args.output
    data_dir = values.get("data_dir") or data_dir_set()
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
    from cli.serving import parse_range, print_predictions
    from flows.chain import TrainingRunFailed, run_chain
    from mnist_client.client import ServingError
    from serving.stack import StackError
    from tasks.data import DataError

    params = training_params(args)
    if not params.publish:
        raise CliError("mnist run serves what it publishes: drop --no-publish (or use mnist train)", exit_code=2)
    from storage.s3 import StoreError

    queries = parse_range(args.queries, "--queries")
    try:
        with run_chain(params, pipeline_settings().state_dir, queries) as (result, answers):
            print_training_result(result)
            print(f"gRPC predictions from the served 'stable' model through the logging gateway "
                  f"(MNIST test digits {args.queries}):")
            print_predictions(answers, as_json=False)
            correct = sum(answer["digit"] == answer["label"] for answer in answers)
            print(f"{correct}/{len(answers)} correct")
            print(NEXT_STEPS, flush=True)
    except (StackError, ServingError, StoreError, TrainingRunFailed, DataError) as error:
        raise CliError(str(error)) from None
    return 0


NEXT_STEPS = """next:
  make serve     keep it served: model server, sync sidecar, logging gateway (prints the export lines)
  make prefect   the Prefect UI at http://127.0.0.1:4200; then make deploy (schedules) and make worker (runs them)
  mnist registry list      what the store holds (mnist registry history: how stable moved)"""


def add_training_parsers(commands: argparse._SubParsersAction) -> None:
    from flows.params import TrainingParams

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
