"""``mnist data``: ingest new labelled digits and look at dataset versions."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from cli.common import CliError, pipeline_settings, print_json, reachable_store, registry_store, store_for_cli
from storage.settings import prefect_api_url
from tasks.results import Ingested


def dataset_store(interactive: bool = True):
    from storage.datasets import DatasetStore
    from storage.settings import DatasetSettings

    return store_for_cli(DatasetSettings, DatasetStore, interactive)


def mnist_splits():
    from tasks.data import DataError, load_mnist_idx

    data_dir = pipeline_settings().data_dir
    if data_dir is None:
        raise CliError("set MNIST_DATA_DIR to the MNIST files: new digits are checked against MNIST's own",
                       exit_code=2)
    try:
        train, test, _ = load_mnist_idx(data_dir)
    except DataError as error:
        raise CliError(str(error), exit_code=2) from None
    return train, test


def mnist_reference():
    """What every batch is checked against: MNIST's digits (never ingested again) and its statistics."""
    from tasks.ingest import mnist_reference

    train, test = mnist_splits()
    return mnist_reference(train.images, test.images, test.labels)


@contextmanager
def screened_ingest():
    """The dataset store, MNIST's reference and the trusted models' screen, for one ingest."""
    from tasks.ingest import mnist_reference
    from tasks.screen import trusted_screen

    train, test = mnist_splits()  # before the store: a missing MNIST folder is refused without waiting
    reference = mnist_reference(train.images, test.images, test.labels)
    with reachable_store(lambda: dataset_store(interactive=False)) as store, \
            reachable_store(lambda: registry_store(interactive=False)) as models, \
            trusted_screen(models, test.images, test.labels) as calibrations:
        yield store, reference, calibrations


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


def data_add(args: argparse.Namespace) -> int:
    from storage.datasets import SOURCE_PATTERN
    from tasks.ingest import IngestError, ingest

    if args.from_feedback:
        return add_from_feedback(args)
    if not args.path or not args.source:
        raise CliError("give PATH and --source NAME (or --from-feedback)", exit_code=2)
    if not Path(args.path).exists():
        raise CliError(f"{args.path}: no such file or folder (give a folder of 0-9 sub-folders, a .csv or "
                       "a .npz)", exit_code=2)
    if not SOURCE_PATTERN.match(args.source):
        raise CliError(f"--source {args.source!r}: use lower-case letters, digits, '.', '_' or '-' (max 63)",
                       exit_code=2)
    with screened_ingest() as (store, reference, calibrations):
        try:
            result = ingest(store, Path(args.path), args.source, reference,
                            allow_outside=args.allow_paths_outside, screen_with=calibrations)
        except IngestError as error:
            raise CliError(str(error)) from None
    return report_added(result, args.source, result.model_dump(mode="json") if args.json else None)


def data_list(args: argparse.Namespace, store) -> None:
    rows = version_rows(store)
    if args.json:
        print_json(rows)
        return
    if not rows:
        print(f"no dataset versions in {store.uri()}: only the MNIST base (mnist data add adds one)")
        return
    print(f"{'version':>7}  {'examples':>8}  {'created':<29}  sources (train/validation/test)")
    for row in rows:
        sources = ", ".join(f"{name} {c['train']}/{c['validation']}/{c['test']}"
                            for name, c in sorted(row["sources"].items()))
        print(f"{row['version']:>7}  {row['examples']:>8}  {row['created_at']:<29}  {sources}")


def data_show(args: argparse.Namespace, store) -> None:
    version = store.version(args.version)
    details = [store.batch_manifest(digest) for digest in version["batches"]]
    # feedback batches say what the quarantine policy took: trusted, agreed, held back
    feedback = {d["sha256"][:12]: d["feedback"] for d in details if isinstance(d.get("feedback"), dict)}
    print_json({**version, "batch_details": details} if args.json
               else {**version, **({"feedback_batches": feedback} if feedback else {})})


def data_diff(args: argparse.Namespace, store) -> None:
    difference = diff_versions(store, args.older, args.newer)
    if args.json:
        print_json(difference)
        return
    print(f"dataset version {args.older} -> {args.newer}: +{difference['added_examples']} examples")
    for sign, key in (("+", "added_batches"), ("-", "removed_batches")):
        for batch in difference[key]:
            print(f"  {sign} batch {batch['sha256'][:12]}  {batch['source']:<20} {batch['count']:>6}")


def data_compact(args: argparse.Namespace, store) -> None:
    compact_latest(store, args.pack_examples, args.json)


STORE_ACTIONS: dict[str, Callable[[argparse.Namespace, Any], None]] = {
    "compact": data_compact, "list": data_list, "show": data_show, "diff": data_diff}


def command_data(args: argparse.Namespace) -> int:
    if args.action == "add":
        return data_add(args)
    if args.action in QUARANTINE_ACTIONS:
        return QUARANTINE_ACTIONS[args.action](args)
    with reachable_store(dataset_store) as store:
        STORE_ACTIONS[args.action](args, store)
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
    if prefect_api_url():  # a server's automations may retrain on it
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
    if result.quarantine:
        held = result.quarantine
        print(f"held {held['count']} examples in quarantine {held['sha256'][:12]}, e.g. {held['reasons'][0]} "
              "(mnist data quarantine)")
    return 0


# --- quarantine: what the screen held back -------------------------------------------------
def held_rows(store, source: str | None = None) -> list[dict[str, Any]]:
    """Every held batch with examples still pending, with its source and why it waits."""
    from tasks.ingest import pending_held

    rows = []
    for digest in store.quarantined():
        manifest, pending = pending_held(store, digest)
        if pending and (source is None or manifest.get("source") == source):
            rows.append({"id": digest[:12], "sha256": digest, "source": manifest.get("source"),
                         "count": manifest["count"], "pending": len(pending), "held": manifest.get("held"),
                         "reason": manifest["reasons"][pending[0]], "quarantined_at": manifest.get("ingested_at")})
    return rows


def full_id(store, given: str) -> str:
    """A held batch's digest from its first 12 (or more) hex characters."""
    matches = [digest for digest in store.quarantined() if digest.startswith(given.lower())] if len(given) >= 6 else []
    if len(matches) != 1:
        raise CliError(f"{given[:70]!r}: no held batch of that id (mnist data quarantine lists them)", exit_code=2)
    return matches[0]


def show_quarantine(args: argparse.Namespace) -> int:
    from tasks.ingest import pending_held

    with reachable_store(dataset_store) as store:
        if args.id:
            digest = full_id(store, args.id)
            manifest, pending = pending_held(store, digest)
            examples = [{"example": i, "name": manifest["names"][i] if i < len(manifest.get("names", [])) else None,
                         "reason": manifest["reasons"][i]} for i in pending]
            if args.json:
                print_json({**{k: v for k, v in manifest.items() if k not in ("names", "reasons")},
                            "pending": examples})
                return 0
            print(f"held batch {digest[:12]} from {manifest.get('source')}: {len(pending)} of {manifest['count']} "
                  f"examples pending" + (f"; held as a whole: {manifest['held']}" if manifest.get("held") else ""))
            for example in examples:
                print(f"  {example['example']:>5}  {example['name']}: {example['reason']}")
            return 0
        rows = held_rows(store)
    if args.json:
        print_json(rows)
    elif not rows:
        print("nothing waits in quarantine")
    else:
        for row in rows:
            why = f"held as a whole: {row['held']}" if row["held"] else row["reason"]
            print(f"{row['id']}  {row['source']:<20} {row['pending']:>6} of {row['count']:<6} pending  {why}")
        print("mnist data quarantine ID lists each example's reason; mnist data accept|reject ID decides")
    return 0


def targets(store, args: argparse.Namespace) -> list[tuple[str, list[int] | None]]:
    """(held batch, its examples to decide on; None: every pending one) for an ID, a --source or a
    --caller (the held feedback labels that caller gave)."""
    if sum(map(bool, (args.id, args.source, args.caller))) != 1:
        raise CliError("give a held batch's ID, --source NAME or --caller NAME", exit_code=2)
    if args.id:
        return [(full_id(store, args.id), example_list(args.examples))]
    if args.examples:
        raise CliError("--examples goes with a held batch's ID", exit_code=2)
    if args.source:
        return [(row["sha256"], None) for row in held_rows(store, args.source)]
    return [(row["sha256"], examples) for row in held_rows(store)
            if (examples := by_caller(store, row["sha256"], args.caller))]


def by_caller(store, digest: str, caller: str) -> list[int]:
    """The pending examples of a held batch that rest on ``caller``'s label."""
    from tasks.ingest import pending_held

    manifest, pending = pending_held(store, digest)
    listed = manifest.get("callers")
    callers: list[Any] = listed if isinstance(listed, list) else []
    return [i for i in pending if i < len(callers) and isinstance(callers[i], list) and caller in callers[i]]


def example_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isascii() and part.isdigit() and len(part) <= 9 for part in parts):
        raise CliError(f"--examples {text[:40]!r}: give example numbers as 0,3,17", exit_code=2)
    return [int(part) for part in parts]


def accept_quarantined(args: argparse.Namespace) -> int:
    from tasks.ingest import IngestError, accept_held

    reference = mnist_reference()
    with reachable_store(lambda: dataset_store(interactive=False)) as store:
        chosen = targets(store, args)
        if not chosen:
            print(f"nothing of {args.source or args.caller} waits in quarantine")
        for digest, examples in chosen:
            try:
                result = accept_held(store, digest, reference, "operator", examples)
            except IngestError as error:
                raise CliError(str(error)) from None
            if result is None:
                print(f"held batch {digest[:12]}: accepted; every example was already known")
            else:
                print(f"held batch {digest[:12]}: accepted {result.batch['count']} examples as batch "
                      f"{result.batch['sha256'][:12]}, dataset version {result.version['version']}")
    return 0


def reject_quarantined(args: argparse.Namespace) -> int:
    from tasks.ingest import IngestError, reject_held

    with reachable_store(lambda: dataset_store(interactive=False)) as store:
        for digest, examples in targets(store, args):
            try:
                count = reject_held(store, digest, "operator", examples)
            except IngestError as error:
                raise CliError(str(error)) from None
            print(f"held batch {digest[:12]}: rejected {count} examples; they never train")
    return 0


def rescreen_quarantined(args: argparse.Namespace) -> int:
    """Held examples screened again by today's trusted models: what passes is accepted (by the
    screen), what is still flagged keeps waiting."""
    from tasks.ingest import rescreen_held

    with screened_ingest() as (store, reference, calibrations):
        if not calibrations:
            raise CliError("no trusted model to screen against yet: mnist train publishes one")
        for row in held_rows(store):
            accepted, waiting = rescreen_held(store, row["sha256"], reference, calibrations)
            print(f"held batch {row['id']}: {accepted} examples pass the screen now and were added; "
                  f"{waiting} still wait")
    return 0


QUARANTINE_ACTIONS = {"quarantine": show_quarantine, "accept": accept_quarantined, "reject": reject_quarantined,
                      "screen": rescreen_quarantined}


def add_from_feedback(args: argparse.Namespace) -> int:
    """The feedback on logged predictions since the last time, as one batch through the normal ingest."""
    from cli.common import traffic_stores
    from tasks.feedback import ingest_feedback
    from tasks.ingest import IngestError

    if args.path:
        raise CliError("--from-feedback reads the store's feedback: give no PATH", exit_code=2)
    source = args.source or "feedback"
    with screened_ingest() as (store, reference, calibrations):
        logs, feedback = traffic_stores()
        try:
            result = ingest_feedback(store, logs, feedback, reference, source, screen_with=calibrations)
        except IngestError as error:
            raise CliError(str(error)) from None
    if result is None:
        print("no new feedback since the last mnist data add --from-feedback")
        return 0
    for problem in result.problems:
        print(f"warning: {problem}", file=sys.stderr)
    policy = result.policy
    waiting = (f"{policy.quarantined} image(s) in quarantine, {policy.capped} held back by the per-caller "
               f"cap and {policy.over_budget} by the window budgets (mnist feedback review)"
               + (f"; {policy.screened_out} held by the data screen (mnist data quarantine)"
                  if policy.screened_out else ""))
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
    quarantine = actions.add_parser("quarantine", help="what the screen holds back, with the reasons")
    quarantine.add_argument("id", nargs="?", help="one held batch's id: every pending example's reason")
    quarantine.add_argument("--json", action="store_true")
    for name, verb in (("accept", "add them to the dataset: they may train"), ("reject", "they never train")):
        decide = actions.add_parser(name, help=f"an operator's decision on held examples: {verb}")
        decide.add_argument("id", nargs="?", help="the held batch's id (mnist data quarantine)")
        decide.add_argument("--source", help="every held batch of this source instead")
        decide.add_argument("--caller", help="every held feedback label this caller gave instead")
        decide.add_argument("--examples", metavar="N,N,...", help="only these example numbers (default: all pending)")
    actions.add_parser("screen", help="screen held examples again with today's trusted models; add what passes")
    diff = actions.add_parser("diff", help="batches added and removed between two versions")
    diff.add_argument("older", type=int)
    diff.add_argument("newer", type=int)
    diff.add_argument("--json", action="store_true")
    data.set_defaults(handler=command_data)
