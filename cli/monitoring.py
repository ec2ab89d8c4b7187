"""``mnist logs``, ``mnist feedback``, ``mnist drift`` and ``mnist check``: the served traffic read
back, corrected and compared (the gateway that logs it is ``cli/gateway.py``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.common import CliError, default_server, print_json, reachable_store, traffic_stores
from storage.settings import prefect_api_url

MAX_LOG_HOURS = 24 * 366


def command_feedback(args: argparse.Namespace) -> int:
    words = args.words
    if words[:1] == ["review"]:
        if len(words) > 1 or args.csv:
            raise CliError("mnist feedback review takes no other argument", exit_code=2)
        return review_feedback(args.json)
    if words[:1] == ["accept"]:
        if len(words) not in (2, 3) or args.csv:
            raise CliError("give mnist feedback accept REQUEST_ID [LABEL] [--index N]", exit_code=2)
        words = [words[1], words[2] if len(words) == 3 else quarantined_label(words[1], args.index)]
    if args.csv:
        if words:
            raise CliError("give REQUEST_ID LABEL or --csv FILE, not both", exit_code=2)
        rows = feedback_rows(Path(args.csv))
    elif len(words) == 2:
        rows = [(words[0], words[1], args.index)]
        checked_rows(rows)
    else:
        raise CliError("give REQUEST_ID LABEL (the id the gateway returned), --csv FILE of request_id,label, "
                       "review, or accept REQUEST_ID [LABEL]", exit_code=2)
    return record_rows(rows, args.json)


def feedback_rows(path: Path) -> list[tuple[str, str, int]]:
    from storage.feedback import FeedbackError
    from tasks.feedback import read_feedback_csv

    try:
        return checked_rows(read_feedback_csv(path))
    except FeedbackError as error:
        raise CliError(str(error), exit_code=2) from None


def checked_rows(rows: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """Labels and indexes checked before the store is reached: bad input is refused at once."""
    from storage.feedback import FeedbackError, checked_index, checked_label

    try:
        for _, label, index in rows:
            checked_label(label)
            checked_index(index)
    except FeedbackError as error:
        raise CliError(str(error), exit_code=2) from None
    return rows


def record_rows(rows: list[tuple[str, str, int]], as_json: bool) -> int:
    """Labels given with the store's own credentials: an operator's, trusted."""
    from storage.feedback import FeedbackError, record_feedback
    from storage.live_check import live_check_key

    recorded, refused = [], []
    with reachable_store(traffic_stores) as (logs, feedback):
        key = live_check_key(logs.settings)
        for request_id, label, index in rows:
            try:
                recorded.append(record_feedback(logs, feedback, request_id, label, index, source="cli",
                                                live_check_key=key))
            except FeedbackError as error:
                refused.append(str(error))
    if as_json:
        print_json({"recorded": recorded, "refused": refused})
    else:
        for item in recorded:
            print(f"recorded: request {item['request_id']} image {item['index']} is a {item['label']} "
                  f"(answered by version {item['version']})")
    if refused:
        raise CliError(f"{len(refused)} of {len(rows)} refused: " + "; ".join(refused[:5]))
    return 0


def pending_decision():
    from tasks.feedback import pending_decision as decided_now

    with reachable_store(traffic_stores) as (_, feedback):
        return decided_now(feedback)


def review_feedback(as_json: bool) -> int:
    """What the next ingest would take, and what waits in quarantine with its votes."""
    decision = pending_decision()
    if as_json:
        print_json({**decision.summary().model_dump(), "waiting": decision.quarantined})
        return 0
    summary = decision.summary()
    print(f"next ingest takes {summary.trusted} trusted and {summary.agreed} agreed label(s); "
          f"{summary.capped} agreed held back by the per-caller cap and {summary.over_budget} by the window "
          f"budgets; {summary.quarantined} image(s) in quarantine")
    for item in decision.quarantined:
        votes = ", ".join(f"{label} by {' '.join(callers)}" for label, callers in item["votes"].items())
        print(f"  {item['request_id']} image {item['index']}: {votes}")
    if decision.quarantined:
        print("mnist feedback accept REQUEST_ID [LABEL] [--index N] makes a label an operator's")
    return 0


def quarantined_label(request_id: str, index: int) -> str:
    """The label most callers gave an image in quarantine, when one leads."""
    waiting = next((item for item in pending_decision().quarantined
                    if item["request_id"] == request_id and item["index"] == index), None)
    if waiting is None:
        raise CliError(f"request {request_id} image {index} has no label in quarantine; give the LABEL", exit_code=2)
    ranked = sorted(waiting["votes"].items(), key=lambda pair: -len(pair[1]))
    if len(ranked) > 1 and len(ranked[0][1]) == len(ranked[1][1]):
        raise CliError(f"request {request_id} image {index}: callers disagree "
                       f"({', '.join(waiting['votes'])}); give the LABEL", exit_code=2)
    return ranked[0][0]


def batch_summary(key: str, index: dict, entries: list) -> dict:
    """One log batch as ``mnist logs list`` shows it, from its index alone."""
    return {"key": key, "first_call": entries[0].time if entries else None, "records": len(entries),
            "images": sum(entry.examples for entry in entries),
            "versions": sorted({entry.version for entry in entries if entry.version is not None}),
            "stored_bytes": index["file"]["size"], "records_bytes": index["file"].get("records_size")}


def list_logs(logs, hours: float) -> tuple[list[dict], list[str]]:
    """The batches with calls in the last ``hours`` hours (their calls from then on), oldest first,
    and the indexes that could not be read."""
    from datetime import datetime

    from storage.logs import day_folders, hours_ago
    from storage.s3 import VerificationFailed

    since = hours_ago(hours)
    batches, problems = [], []
    for key in logs.batch_keys(day_folders(since)):
        try:
            index, entries = logs.read_index(key)
        except VerificationFailed as error:
            problems.append(str(error))
            continue
        recent = [entry for entry in entries if entry and datetime.fromisoformat(entry.time) >= since]
        if None in entries:  # the rest of the batch reads: said, not fatal
            print(f"mnist logs: {key}: {entries.count(None)} malformed entries skipped", file=sys.stderr)
        if recent:
            batches.append(batch_summary(key, index, recent))
    return batches, problems


def logged_request(logs, request_id: str, hours: float) -> dict:
    """One logged request: its index entry, and each image's answered digit and confidence."""
    from dataclasses import asdict

    from tasks.digits import logged_digits

    key, position, entry = logs.find(request_id, hours)
    _, probabilities = logged_digits(logs.read_batch(key)[position][1])
    answers = [] if probabilities is None else [
        {"index": i, "digit": int(row.argmax()), "confidence": float(row.max())} for i, row in enumerate(probabilities)]
    return {**asdict(entry), "log": key, "answers": answers}


def show_logged_request(logs, args: argparse.Namespace) -> None:
    from storage.logs import LogNotFound
    from storage.s3 import VerificationFailed

    try:
        shown = logged_request(logs, args.request_id, args.hours)
    except (LogNotFound, VerificationFailed) as error:
        raise CliError(str(error)) from None
    if args.json:
        print_json(shown)
        return
    print(f"request {shown['request_id']}: {shown['time']} over {shown['api']}, answered by version "
          f"{shown['version']}{' (label ' + shown['label'] + ')' if shown['label'] else ''}, "
          f"{shown['examples']} image(s); in {shown['log']}")
    for answer in shown["answers"]:
        print(f"  image {answer['index']}: {answer['digit']} ({answer['confidence']:.3f})")


def show_log_batches(logs, args: argparse.Namespace) -> None:
    batches, problems = list_logs(logs, args.hours)
    if args.json:
        print_json({"batches": batches, "problems": problems})
    else:
        for batch in batches:
            before = f" ({batch['records_bytes'] / 1024:.1f} KiB before gzip)" if batch["records_bytes"] else ""
            print(f"{batch['first_call']}  {batch['records']} records, {batch['images']} images, versions "
                  f"{','.join(map(str, batch['versions'])) or '-'}  {batch['stored_bytes'] / 1024:.1f} KiB{before}  "
                  f"{batch['key']}")
        print(f"{len(batches)} log batches, {sum(b['records'] for b in batches)} logged requests in the last "
              f"{args.hours:g} hours of {logs.uri()}")
    if problems:
        raise CliError(f"{len(problems)} log batch index(es) refused: " + "; ".join(problems[:3]))


def command_logs(args: argparse.Namespace) -> int:
    if not 0 < args.hours <= MAX_LOG_HOURS:
        raise CliError(f"--hours {args.hours:g}: must be above 0 and at most {MAX_LOG_HOURS} (a year)", exit_code=2)
    with reachable_store(traffic_stores) as (logs, _):
        if args.action == "show":
            show_logged_request(logs, args)
        else:
            show_log_batches(logs, args)
    return 0


def command_drift(args: argparse.Namespace) -> int:
    """Run the drift flow once and print each version's verdict."""
    from pydantic import ValidationError

    from cli.common import pipeline_settings, validation_message
    from flows.drift import drift_flow
    from flows.params import DriftParams
    from storage.embedded import store_environment
    from tasks.results import DriftRun

    values = {name: getattr(args, name) for name in DriftParams.model_fields if getattr(args, name) is not None}
    try:
        params = DriftParams(**values)
    except ValidationError as error:
        raise CliError(validation_message(error), exit_code=2) from None
    with store_environment(pipeline_settings().state_dir):
        state = drift_flow(params, return_state=True)
    if not state.is_completed():
        raise CliError(f"drift run {state.name}: {state.message}")
    result = state.result()
    if not isinstance(result, DriftRun):
        raise CliError(f"drift run {state.name} ended without a result: {state.message}")
    if args.json:
        print_json(result.model_dump(mode="json"))
        return 0
    for version, verdict in sorted(result.results.items()):
        drifted = f": {', '.join(verdict.drifted)}" if verdict.drifted else ""
        print(f"version {version}: {verdict.verdict}{drifted} ({verdict.images} logged images)")
        for name, score in verdict.scores.items():
            print(f"  {name:<16} effect {score.statistic:.3f}  p {score.p_value:.1e}"
                  f"{'  DRIFT' if score.drift else ''}")
    for note in result.notes:
        print(note)
    if not result.results and not result.notes:
        print(state.message)
    print(f"report: {result.report_dir} (and the mnist-drift artifact in the Prefect UI)")
    return 0


def command_check(args: argparse.Namespace) -> int:
    """The server against the registry; exit 1 naming each disagreement that outlived the grace period."""
    from flows.serving_check import mismatch_event
    from mnist_client.client import Target
    from serving.truth import check_serving

    with reachable_store() as store:
        target = Target(args.server, store.settings.model_name, timeout=args.timeout)
        problems = check_serving(store, target, args.grace_seconds)
        if problems and prefect_api_url():  # automations may act on it
            mismatch_event(store, args.server, problems)
        labels = store.labels()
    if problems:
        raise CliError(f"the server at {args.server} disagrees with the registry: " + "; ".join(problems))
    shown = ", ".join(f"{label} -> v{version}" for label, version in sorted(labels.items())) or "no labels"
    print(f"the server at {args.server} serves what the registry says ({shown})")
    return 0


def add_monitoring_parsers(commands: argparse._SubParsersAction) -> None:
    logs = commands.add_parser(
        "logs", help="the prediction logs: batches of the last hours, or one logged request",
        description="Read back what the gateway logged: the log batches of the last hours (from their indexes), "
                    "or one request by the id the gateway returned, with the digits it was answered.")
    actions = logs.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="log batches of the last hours, oldest first")
    show = actions.add_parser("show", help="one logged request and its answers")
    show.add_argument("request_id", metavar="REQUEST_ID")
    for action in (listing, show):
        action.add_argument("--hours", type=float, default=24.0,
                            help="the last H hours, rolling, as mnist drift's --window-hours (default 24)")
        action.add_argument("--json", action="store_true")
    logs.set_defaults(handler=command_logs)

    feedback = commands.add_parser(
        "feedback", help="record the correct label of a logged prediction; review and accept quarantined ones",
        usage="mnist feedback REQUEST_ID LABEL [--index N] | --csv FILE | review | accept REQUEST_ID [LABEL]",
        description="Record the correct digit for a request the gateway logged (its id is in the x-request-id "
                    "trailer or X-Request-Id header), as an operator: trusted. Labels that untrusted callers "
                    "sent through the gateway wait in quarantine until enough callers agree; 'review' lists them "
                    "and 'accept' makes one an operator's. mnist data add --from-feedback turns accepted feedback "
                    "into data.")
    feedback.add_argument("words", nargs="*", metavar="ARGUMENT",
                          help="REQUEST_ID LABEL, or review, or accept REQUEST_ID [LABEL]")
    feedback.add_argument("--index", type=int, default=0, help="the image's position in its request (default 0)")
    feedback.add_argument("--csv", metavar="FILE", help="a CSV of request_id,label[,index] rows")
    feedback.add_argument("--json", action="store_true")
    feedback.set_defaults(handler=command_feedback)

    drift = commands.add_parser(
        "drift", help="compare logged traffic with each version's reference statistics (the mnist-drift flow)",
        description="Run the mnist-drift flow once: the last window of logged requests against the reference "
                    "statistics published with the version that answered them (scipy.stats two-sample tests).")
    from cli.common import add_model_flags
    from flows.params import DriftParams

    add_model_flags(drift, DriftParams)
    drift.add_argument("--json", action="store_true")
    drift.set_defaults(handler=command_drift)

    check = commands.add_parser(
        "check", help="does the server serve what the registry says? exit 1 when not",
        description="Compare what the server reports (GetModelStatus; each label through GetModelMetadata) with "
                    "the registry's labels and newest published version. A disagreement that lasts the grace "
                    "period (a version that failed to load, a label the server does not know) exits 1, naming it, "
                    "and emits mnist.serving.mismatch when PREFECT_API_URL is set.")
    check.add_argument("--server", default=default_server(),
                       help="HOST:PORT (default: MNIST_SERVING_ADDRESS or localhost:8500)")
    check.add_argument("--grace-seconds", type=float, default=120.0,
                       help="how long a disagreement may last before it counts (default 120: a sync round and a load)")
    check.add_argument("--timeout", type=float, default=10.0, help="deadline per call in seconds (default 10)")
    check.set_defaults(handler=command_check)
