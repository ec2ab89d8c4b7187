"""``mnist data``: ingest new labelled digits and look at dataset versions."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cli.common import CliError, pipeline_settings, print_json, reachable_store, store_for_cli
from tasks.results import Ingested


def dataset_store(interactive: bool = True):
    from storage.datasets import DatasetSettings, DatasetStore

    return store_for_cli(DatasetSettings, DatasetStore, interactive)


def mnist_reference():
    """What every batch is checked against: MNIST's digits (never ingested again) and its statistics."""
    from tasks.data import DataError, load_mnist_idx
    from tasks.ingest import mnist_reference

    data_dir = pipeline_settings().data_dir
    if data_dir is None:
        raise CliError("set MNIST_DATA_DIR to the MNIST files: new digits are checked against MNIST's own",
                       exit_code=2)
    try:
        train, test, _ = load_mnist_idx(data_dir)
    except DataError as error:
        raise CliError(str(error), exit_code=2) from None
    return mnist_reference(train.images, test.images, test.labels)


def version_rows(store) -> list[dict[str, Any]]:
    return [{key: manifest.get(key) for key in ("version", "examples", "sources", "created_at", "fingerprint")}
            for manifest in map(store.version, store.versions())]


def diff_versions(store, older: int, newer: int) -> dict[str, Any]:
    before, after = store.version(older), store.version(newer)
    manifests = {digest: store.batch_manifest(digest)
                 for digest in set(after["batches"]) ^ set(before["batches"])}  # read once each
    summary = lambda digest: {key: manifests[digest][key]  # noqa: E731
                              for key in ("sha256", "source", "count", "split_counts")}
    added = sorted(set(after["batches"]) - set(before["batches"]))
    removed = sorted(set(before["batches"]) - set(after["batches"]))
    return {"from": older, "to": newer, "added_batches": [summary(d) for d in added],
            "removed_batches": [summary(d) for d in removed],
            "added_examples": sum(manifests[d]["count"] for d in added)}


def command_data(args: argparse.Namespace) -> int:
    from tasks.ingest import IngestError, ingest

    if args.action == "add" and args.from_feedback:
        return add_from_feedback(args)
    if args.action == "add":
        from storage.datasets import SOURCE_PATTERN

        if not args.path or not args.source:
            raise CliError("give PATH and --source NAME (or --from-feedback)", exit_code=2)
        if not Path(args.path).exists():
            raise CliError(f"{args.path}: no such file or folder (give a folder of 0-9 sub-folders, a .csv or "
                           "a .npz)", exit_code=2)
        if not SOURCE_PATTERN.match(args.source):
            raise CliError(f"--source {args.source!r}: use lower-case letters, digits, '.', '_' or '-' (max 63)",
                           exit_code=2)
        reference = mnist_reference()  # before the store: a missing MNIST folder is refused without waiting
        with reachable_store(lambda: dataset_store(interactive=False)) as store:
            try:
                result = ingest(store, Path(args.path), args.source, reference,
                                allow_outside=args.allow_paths_outside)
            except IngestError as error:
                raise CliError(str(error)) from None
        return report_added(result, args.source, result.model_dump(mode="json") if args.json else None)
    with reachable_store(dataset_store) as store:
        if args.action == "compact":
            return compact_latest(store, args.pack_examples, args.json)
        if args.action == "list":
            rows = version_rows(store)
            if args.json:
                print_json(rows)
            elif not rows:
                print(f"no dataset versions in {store.uri()}: only the MNIST base (mnist data add adds one)")
            else:
                print(f"{'version':>7}  {'examples':>8}  {'created':<29}  sources (train/validation/test)")
                for row in rows:
                    sources = ", ".join(f"{name} {c['train']}/{c['validation']}/{c['test']}"
                                        for name, c in sorted(row["sources"].items()))
                    print(f"{row['version']:>7}  {row['examples']:>8}  {row['created_at']:<29}  {sources}")
        elif args.action == "show":
            version = store.version(args.version)
            details = [store.batch_manifest(digest) for digest in version["batches"]]
            # feedback batches say what the quarantine policy took: trusted, agreed, held back
            feedback = {d["sha256"][:12]: d["feedback"] for d in details if isinstance(d.get("feedback"), dict)}
            print_json({**version, "batch_details": details} if args.json
                       else {**version, **({"feedback_batches": feedback} if feedback else {})})
        elif args.action == "diff":
            difference = diff_versions(store, args.older, args.newer)
            if args.json:
                print_json(difference)
            else:
                print(f"dataset version {args.older} -> {args.newer}: +{difference['added_examples']} examples")
                for sign, key in (("+", "added_batches"), ("-", "removed_batches")):
                    for batch in difference[key]:
                        print(f"  {sign} batch {batch['sha256'][:12]}  {batch['source']:<20} {batch['count']:>6}")
    return 0


def compact_latest(store, pack_examples: int | None, as_json: bool) -> int:
    """Pack the latest version's small batches, the last unfilled group too."""
    from storage.datasets import PACK_EXAMPLES

    version = store.latest()
    if version is None:
        print(f"no dataset versions in {store.uri()}: nothing to pack")
        return 0
    try:
        packs = store.compact(version, pack_examples or PACK_EXAMPLES)
    except ValueError as error:
        raise CliError(f"--pack-examples: {error}", exit_code=2) from None
    if as_json:
        print_json(packs)
    elif not packs:
        print(f"dataset version {version['version']}: no two small batches left outside a pack")
    for pack in [] if as_json else packs:
        print(f"packed {len(pack['batches'])} batches ({pack['count']} examples) as pack {pack['sha256'][:12]}: "
              f"{pack['files']['pack.bin.z']['size']:,} bytes compressed from {pack['bytes']:,}")
    return 0


def report_added(result: Ingested, source: str, json_document: dict[str, Any] | None) -> int:
    """What was added; ``json_document``: print it instead (``--json``)."""
    batch, version = result.batch, result.version
    if os.environ.get("PREFECT_API_URL"):  # a server's automations may retrain on it
        from flows.ingest import data_added_event

        data_added_event(result, source)
    if json_document is not None:
        print_json(json_document)
        return 0
    print(f"added {batch['count']} examples from {source} as batch {batch['sha256'][:12]} "
          f"(train {batch['split_counts']['train']}, validation {batch['split_counts']['validation']}, "
          f"test {batch['split_counts']['test']})")
    print(f"dataset version {version['version']}: {version['examples']} examples in "
          f"{len(version['batches'])} batches")
    for warning in result.report.warnings:
        print(f"warning: {warning}")
    if result.packed:
        print(f"packed the small batches into {len(result.packed)} pack(s) (mnist data compact)")
    if result.skipped:
        print(f"left out {len(result.skipped)} exact duplicates of known examples, e.g. {result.skipped[0]}")
    return 0


def add_from_feedback(args: argparse.Namespace) -> int:
    """The feedback on logged predictions since the last time, as one batch through the normal ingest."""
    from cli.monitoring import traffic_stores
    from tasks.feedback import ingest_feedback
    from tasks.ingest import IngestError

    if args.path:
        raise CliError("--from-feedback reads the store's feedback: give no PATH", exit_code=2)
    source = args.source or "feedback"
    reference = mnist_reference()
    with reachable_store(lambda: dataset_store(interactive=False)) as store:
        logs, feedback = traffic_stores()
        try:
            result = ingest_feedback(store, logs, feedback, reference, source)
        except IngestError as error:
            raise CliError(str(error)) from None
    if result is None:
        print("no new feedback since the last mnist data add --from-feedback")
        return 0
    for problem in result.problems:
        print(f"warning: {problem}", file=sys.stderr)
    policy = result.policy
    waiting = (f"{policy.quarantined} image(s) in quarantine, {policy.capped} held back by the per-caller "
               f"cap and {policy.over_budget} by the window budgets (mnist feedback review)")
    if result.feedback_items == 0:
        print(f"no feedback accepted yet: {waiting}")
        return 0
    if result.ingested is None:
        print(f"nothing new: the {result.feedback_items} feedback images are exact duplicates of known examples")
        return 0
    if not args.json:
        print(f"{result.feedback_items} feedback labels ({policy.trusted} trusted, {policy.agreed} agreed "
              f"by several callers, training only), {result.corrections} of them corrections of the served "
              f"answer; {waiting}")
    return report_added(result.ingested, source, result.as_json() if args.json else None)


def add_data_parser(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="ingest new labelled digits; list, show and diff dataset versions",
                               description="The dataset store: validated, deduplicated batches of labelled "
                                           "digits in numbered versions, beside the model store.")
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="ingest a folder of 0-9 sub-folders, a CSV of path,label, or an .npz")
    add.add_argument("path", nargs="?", help="folder with sub-folders 0/ ... 9/ of images, a .csv of path,label, "
                                             "or an .npz with x and y")
    add.add_argument("--source", help="name of where the digits come from (e.g. scanner-b; 'feedback' with "
                                      "--from-feedback)")
    add.add_argument("--from-feedback", action="store_true",
                     help="the feedback on logged predictions since the last time, as one batch (mnist feedback)")
    add.add_argument("--allow-paths-outside", action="store_true",
                     help="let a CSV name images outside its own folder (refused otherwise)")
    add.add_argument("--json", action="store_true", help="print the batch, the version and the report as JSON")
    compact = actions.add_parser("compact", help="pack the latest version's small batches into a few large, "
                                                 "compressed objects (data add does so once a pack is full)")
    compact.add_argument("--pack-examples", type=int, default=None, metavar="N",
                         help="examples per pack (default 50,000: about 8 MB compressed)")
    compact.add_argument("--json", action="store_true", help="print the new packs' manifests")
    listing = actions.add_parser("list", help="dataset versions with their sources and counts")
    listing.add_argument("--json", action="store_true")
    show = actions.add_parser("show", help="one dataset version and its batches")
    show.add_argument("version", type=int)
    show.add_argument("--json", action="store_true", help="with every batch's manifest")
    diff = actions.add_parser("diff", help="batches added and removed between two versions")
    diff.add_argument("older", type=int)
    diff.add_argument("newer", type=int)
    diff.add_argument("--json", action="store_true")
    data.set_defaults(handler=command_data)
