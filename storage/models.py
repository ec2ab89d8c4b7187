"""The model registry on S3: TF Serving's layout plus a manifest per version.

Layout (``docs/model-store.md``, "The model store")::

    <prefix>/<model>/<version>/saved_model.pb, variables/..., assets.extra/manifest.json
    <prefix>/<model>/_registry/claims/<version>     one per allocated number, never deleted
    <prefix>/<model>/_registry/labels.json          {"stable": 3, "canary": 4, "_retired": [1, 2]}
    <prefix>/<model>/_registry/history/<time>-<id>.json   one object per event

A version is published only when its manifest exists and every file matches it;
the manifest is written last. Version numbers are claimed with a conditional
write (``If-None-Match: *``), so racing publishers never share one, and claims
outlive garbage collection, so a number is never reused.

Labels and gc meet in one document, ``labels.json``, changed only by compare-and-swap:
gc retires a version there (``_retired``) before deleting any of it, and only if no label
names it; a label move refuses a retired version. See docs/model-store.md for the interleavings.

The S3 protocol itself (retries, conditional writes, manifest last) is
``storage.s3``'s; this module holds the model registry's rules on top of it.
"""

from __future__ import annotations

import json
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict

from storage.layout import MANIFEST, SIGNATURE
from storage.s3 import (
    LocalFile,
    ObjectStore,
    StoreAccessDenied,
    StoreError,
    VerificationFailed,
    file_sha256,
    utc_now,
)
from storage.settings import StoreSettings

__all__ = ["MANIFEST", "ModelStore", "StoreError", "StoreAccessDenied", "UnsafeManifest",
           "VerificationFailed", "VersionNotFound", "VersionRetired", "VersionRow", "local_versions",
           "scan_saved_model"]

LABEL_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# In labels.json beside the labels: versions gc is deleting or has deleted, never labelled again.
# No label can have this name (labels start with a letter).
RETIRED = "_retired"


class VersionRow(BaseModel):
    """One published version as ``mnist registry list`` and the registry artifact show it."""

    model_config = ConfigDict(frozen=True)

    version: int
    test_accuracy: float | None
    signed: bool
    slices: dict[str, float]  # accuracy per new source's test slice
    dataset_version: int | None
    labels: list[str]
    published_at: str | None
    uri: str | None


def number(value: Any) -> float | None:
    """A figure read from the bucket, or None when it is not one (a crafted manifest shows as none)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if is_number else None


def version_row(version: int, manifest: dict[str, Any], labels: list[str]) -> VersionRow:
    """The row of a manifest from the bucket: each value of the type the row says, or none."""
    metrics, dataset = (part if isinstance(part := manifest.get(key), dict) else {} for key in ("metrics", "dataset"))
    slices = part if isinstance(part := metrics.get("slices"), dict) else {}
    dataset_version = dataset.get("version")
    text = {key: value if isinstance(value := manifest.get(key), str) else None for key in ("published_at", "uri")}
    return VersionRow(version=version, test_accuracy=number(metrics.get("test_accuracy")),
                      signed=SIGNATURE in (manifest.get("files") or {}),
                      slices={str(name): figure for name, value in slices.items()
                              if (figure := number(value)) is not None},
                      dataset_version=dataset_version if type(dataset_version) is int else None,
                      labels=labels, **text)


class NothingToRollBack(StoreError):
    """A label with no earlier version to move back to."""

    status = "FAILED_PRECONDITION"


class VersionNotFound(StoreError):
    """No complete version with that number."""

    status = "NOT_FOUND"


class VersionRetired(StoreError):
    """A label move to a version gc is deleting (or has deleted)."""

    status = "FAILED_PRECONDITION"


def upload_order(relative: str) -> tuple[int, str]:
    """Variables first, saved_model.pb after everything it refers to (the manifest goes separately)."""
    if relative.startswith("variables/"):
        return (0, relative)
    if relative == "saved_model.pb":
        return (2, relative)
    return (1, relative)


def scan_saved_model(directory: Path) -> list[LocalFile]:
    """Every file of a SavedModel directory (but an old manifest), in upload order."""
    if not (directory / "saved_model.pb").is_file():
        raise StoreError(f"{directory}: not a SavedModel directory (no saved_model.pb)")
    files = [LocalFile(path.relative_to(directory).as_posix(), path, file_sha256(path), path.stat().st_size)
             for path in directory.rglob("*") if path.is_file()]
    return sorted((f for f in files if f.relative != MANIFEST), key=lambda f: upload_order(f.relative))


def local_versions(model_dir: Path) -> list[int]:
    """Integer version directories under ``model_dir``: TF Serving's layout on disk (a symlink is not one)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(entry.name) for entry in model_dir.iterdir()
                  if entry.name.isdigit() and entry.is_dir() and not entry.is_symlink())


# --- a manifest is read from the bucket: trust none of it ------------------------------------
SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9._@+=-][A-Za-z0-9._@+= -]{0,254}$")


class UnsafeManifest(VerificationFailed):
    """A manifest entry that would write outside the version directory or through something special."""


def check_entry(version: int, relative: Any, expected: Any) -> None:
    """A manifest entry is a relative POSIX path of plain names below the version directory,
    with a size and a SHA-256; anything else refuses the version, naming the entry."""
    def refuse(why: str) -> UnsafeManifest:
        return UnsafeManifest(f"version {version}: manifest entry {relative!r} refused: {why}")

    if not isinstance(relative, str) or not relative:
        raise refuse("not a file name")
    if relative.startswith("/") or re.match(r"^[A-Za-z]:", relative) or relative.startswith("\\"):
        raise refuse("absolute path")
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise refuse("'..', '.' or an empty component")
    if not all(SAFE_COMPONENT.match(part) for part in parts):
        raise refuse("a character a file name may not hold (control characters, '\\', ...)")
    if relative == MANIFEST:
        raise refuse("the manifest's own path")
    if not (isinstance(expected, dict) and isinstance(expected.get("size"), int) and expected["size"] >= 0
            and isinstance(expected.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", expected["sha256"])):
        raise refuse("no valid size and SHA-256")


def make_directories(root: Path, directory: Path, version: int, relative: str) -> None:
    """``directory`` and its parents below ``root``, each made here or an existing real directory."""
    current = root
    for part in directory.relative_to(root).parts:
        current = current / part
        if current.is_symlink() or (current.exists() and not current.is_dir()):
            raise UnsafeManifest(f"version {version}: manifest entry {relative!r} refused: "
                                 f"{current.relative_to(root)} is not a plain directory")
        current.mkdir(exist_ok=True)


def open_new(path: Path, version: int, relative: str):
    """A new regular file, never an existing one, a symlink or a special file."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        raise UnsafeManifest(f"version {version}: manifest entry {relative!r} refused: "
                             f"cannot create it ({error.strerror})") from None
    return os.fdopen(descriptor, "w+b")


class ModelStore(ObjectStore):
    """One model's versions, labels and history in an S3 bucket."""

    settings: StoreSettings  # the bucket's settings, and which model

    def __init__(self, settings: StoreSettings, client: Any = None):
        super().__init__(settings, "/".join(part for part in (settings.s3_prefix.strip("/"), settings.model_name)
                                            if part), client)

    # --- versions ---------------------------------------------------------
    def stored_version_dirs(self) -> dict[int, list[dict[str, Any]]]:
        """Objects under each integer version directory, complete or not."""
        versions: dict[int, list[dict[str, Any]]] = {}
        prefix = self.key("")
        for item in self.list_keys(prefix):
            head = item["Key"][len(prefix):].split("/", 1)[0]
            if head.isdigit():
                versions.setdefault(int(head), []).append(item)
        return versions

    def has_manifest(self, version: int, items: list[dict[str, Any]]) -> bool:
        return any(item["Key"] == self.key(version, MANIFEST) for item in items)

    def complete_versions(self) -> list[int]:
        """Versions whose manifest exists: the published ones (readers ignore the rest)."""
        return sorted(version for version, items in self.stored_version_dirs().items()
                      if self.has_manifest(version, items))

    def manifest(self, version: int) -> dict[str, Any]:
        manifest = self.get_json(self.key(version, MANIFEST))
        if manifest is None:
            raise VersionNotFound(f"version {version} of {self.uri()} is not published")
        return manifest

    def publish(self, directory: Path, metadata: dict[str, Any], signing_key: Path | None = None) -> dict[str, Any]:
        """Upload a SavedModel as the next version; returns its manifest.

        Order: sign it when a key is given (the signature becomes one of its files),
        claim the number, upload variables, assets and saved_model.pb with
        server-checked SHA-256s, read every object back and compare, then write the
        manifest, which makes the version visible.
        """
        if signing_key is not None:
            from storage.signing import sign_directory

            sign_directory(directory, signing_key)
        files = scan_saved_model(directory)
        self.ensure_bucket()
        if leftovers := self.leftovers(self.stored_version_dirs()):  # what an interrupted publish left
            for version in set(self.retire(sorted(leftovers))) & set(leftovers):  # retired first, as gc does
                self.delete_version(leftovers[version])
        version = self.claim_number({"source": str(directory), "flow_run_id": metadata.get("flow_run_id")})
        entries = self.upload_verified(self.key(version), files)
        manifest = {**metadata, "model_name": self.settings.model_name, "version": version,
                    "uri": self.uri(version), "published_at": utc_now(), "files": entries}
        self.write_manifest(self.key(version, MANIFEST), manifest)
        return manifest

    def checked_files(self, version: int, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The manifest's file entries, each checked before it becomes a key or a path."""
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise VerificationFailed(f"version {version}: the manifest lists no files")
        for relative, expected in files.items():
            check_entry(version, relative, expected)
        return files

    def verify(self, version: int) -> dict[str, Any]:
        """Stream every file and compare it with the manifest; raise naming the first mismatch."""
        manifest = self.manifest(version)
        for relative, expected in self.checked_files(version, manifest).items():
            self.stream_verified(self.key(version, relative), expected, f"version {version}: {relative}")
        return manifest

    def download(self, version: int, destination: Path) -> dict[str, Any]:
        """Download a complete version into ``destination`` (a fresh directory), streaming and
        checking every file against its manifest. Nothing is written outside ``destination``:
        every entry is checked first, directories are made here, and files are created new,
        never through an existing file or a symlink."""
        manifest = self.manifest(version)
        files = self.checked_files(version, manifest)
        destination.mkdir(parents=True, exist_ok=True)
        root = destination.resolve()
        for relative, expected in files.items():
            target = root.joinpath(*PurePosixPath(relative).parts)
            make_directories(root, target.parent, version, relative)
            with open_new(target, version, relative) as sink:
                self.stream_verified(self.key(version, relative), expected, f"version {version}: {relative}", sink)
        manifest_path = root / MANIFEST
        make_directories(root, manifest_path.parent, version, MANIFEST)
        with open_new(manifest_path, version, MANIFEST) as sink:
            sink.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
        return manifest

    def overview(self) -> list[VersionRow]:
        """Every published version with its accuracy (MNIST and per slice), dataset version, labels and time."""
        labels_by_version: dict[int, list[str]] = {}
        for label, version in self.labels().items():
            labels_by_version.setdefault(version, []).append(label)
        return [version_row(version, self.manifest(version), sorted(labels_by_version.get(version, [])))
                for version in self.complete_versions()]

    # --- labels and history ------------------------------------------------
    def labels_document(self) -> dict[str, Any]:
        """labels.json as stored: the labels, and the versions gc has retired (``_retired``)."""
        return self.get_json(self.key("_registry", "labels.json")) or {}

    def labels(self) -> dict[str, int]:
        return {k: v for k, v in self.labels_document().items() if k != RETIRED}

    def set_label(self, label: str, version: int | None, event: dict[str, Any] | None = None) -> int | None:
        """Point ``label`` at ``version`` (None removes it), with a compare-and-swap on
        labels.json so concurrent movers never lose an update; returns the previous target.
        VersionRetired when gc has retired ``version``: checked inside the swap, so a label
        never lands on a version gc is deleting."""
        if not LABEL_PATTERN.match(label):
            raise StoreError(f"invalid label {label!r}: use lower-case letters, digits, '-' or '_'")
        if version is not None and version not in self.complete_versions():
            raise VersionNotFound(f"version {version} of {self.uri()} is not published")

        def move(document: dict[str, Any] | None) -> dict[str, Any]:
            document = document or {}
            if version is not None and version in document.get(RETIRED, []):
                stays = f"{label} stays on {document[label]}" if label in document else f"{label} stays unset"
                raise VersionRetired(f"version {version} is being deleted by gc; {stays}")
            others = {k: v for k, v in document.items() if k != label}
            return others if version is None else {**others, label: version}

        before, _ = self.update_json(self.key("_registry", "labels.json"), move)
        previous = (before or {}).get(label)
        self.record({"event": "label", "label": label, "version": version, "previous": previous,
                     **(event or {})})
        return previous

    def rollback_target(self, label: str = "stable") -> int | None:
        """The version ``label`` pointed to before the current one (or, without such a record, the
        newest complete version below it); None when there is none. StoreError without the label."""
        return self._rollback_plan(label)[1]

    def _rollback_plan(self, label: str) -> tuple[int, int | None]:
        """The version ``label`` names now, and its ``rollback_target``, from one read of each record."""
        document = self.labels_document()
        current = document.get(label) if label != RETIRED else None
        if current is None:
            raise StoreError(f"nothing to roll back: no {label!r} label in {self.uri()}")
        complete = set(self.complete_versions()) - set(document.get(RETIRED, []))
        earlier_targets = [e["version"] for e in self.history()
                           if e.get("event") == "label" and e.get("label") == label and e.get("version") is not None]
        candidates = [v for v in reversed(earlier_targets) if v != current and v in complete and v < current]
        candidates += sorted((v for v in complete if v < current), reverse=True)
        return current, candidates[0] if candidates else None

    def rollback(self, label: str = "stable", event: dict[str, Any] | None = None) -> tuple[int, int]:
        """Point ``label`` at its ``rollback_target``; NothingToRollBack when there is none.
        A target gc retires meanwhile is planned again without it, as if gc had come first
        (retirement is permanent, so this ends)."""
        while True:
            current, target = self._rollback_plan(label)
            if target is None:
                raise NothingToRollBack(f"nothing to roll back to: no published version of {self.uri()} "
                                        f"before {current}")
            try:
                self.set_label(label, target, {"reason": "rollback", **(event or {})})
                break
            except (VersionRetired, VersionNotFound):
                continue  # gc took it between the plan and the move
        self.record({"event": "rollback", "label": label, "version": target, "previous": current, **(event or {})})
        return current, target

    # --- garbage collection -----------------------------------------------
    def leftovers(self, stored: dict[int, list[dict[str, Any]]], grace_seconds: float | None = None
                  ) -> dict[int, list[dict[str, Any]]]:
        """Of the ``stored`` version directories, those without a manifest whose newest object is
        older than the grace period: an interrupted publish (a running one keeps writing)."""
        grace = self.settings.gc_grace_seconds if grace_seconds is None else grace_seconds
        now = datetime.now(timezone.utc)
        return {v: items for v, items in stored.items()
                if not self.has_manifest(v, items)
                and all((now - i["LastModified"]).total_seconds() >= grace for i in items)}

    def delete_version(self, items: list[dict[str, Any]]) -> None:
        """Manifest first: from that moment no reader takes the version for complete."""
        self.delete_keys([item["Key"] for item in sorted(items, key=lambda i: not i["Key"].endswith(MANIFEST))])

    def retire(self, candidates: list[int]) -> list[int]:
        """Mark for deletion, by compare-and-swap on labels.json, those ``candidates`` no label
        names at the moment of the swap; returns every retired version (earlier ones too). Only a
        retired version may be deleted, and no label ever moves onto one (``set_label``)."""
        def mark(document: dict[str, Any] | None) -> dict[str, Any]:
            document = document or {}
            labelled = {v for k, v in document.items() if k != RETIRED}
            retired = set(document.get(RETIRED, [])) | {v for v in candidates if v not in labelled}
            return {**document, RETIRED: sorted(retired)}

        _, after = self.update_json(self.key("_registry", "labels.json"), mark)
        return after[RETIRED]

    def delete_retired(self, candidates: list[int], stored: dict[int, list[dict[str, Any]]]) -> list[int]:
        """Retire ``candidates``, then delete every retired version still ``stored`` (an
        interrupted gc's too); returns the versions deleted."""
        retired = self.retire(candidates) if candidates else sorted(self.labels_document().get(RETIRED, []))
        doomed = sorted(v for v in retired if v in stored)
        for version in doomed:
            self.delete_version(stored[version])
        return doomed

    def stale_uploads(self, grace_seconds: float | None = None) -> list[dict[str, Any]]:
        """Multipart uploads under this model begun longer than the grace period ago and never
        finished: a publish of a file above the multipart threshold killed mid-file."""
        grace = self.settings.gc_grace_seconds if grace_seconds is None else grace_seconds
        now = datetime.now(timezone.utc)
        return [u for u in self.unfinished_uploads(self.key(""))
                if (now - u["Initiated"]).total_seconds() >= grace]

    def gc(self, keep: int, grace_seconds: float | None = None) -> dict[str, list[Any]]:
        """Delete complete versions beyond the newest ``keep``, leftovers of interrupted
        publishes, and abort their unfinished multipart uploads. Never a labelled version,
        nor the newest complete one."""
        if keep < 1:
            raise StoreError("gc --keep must be at least 1")
        stored = self.stored_version_dirs()
        complete = [v for v, items in stored.items() if self.has_manifest(v, items)]
        old = sorted(complete)[:-keep]
        leftovers = self.leftovers(stored, grace_seconds)
        deleted = self.delete_retired(old + sorted(leftovers), stored)
        aborted = sorted(u["Key"] for u in self.stale_uploads(grace_seconds) if self.abort_upload(u))
        removed: dict[str, list[Any]] = {"removed_versions": [v for v in deleted if v in complete],
                                         "removed_leftovers": [v for v in deleted if v not in complete],
                                         "aborted_uploads": aborted}
        if deleted or aborted:
            self.record({"event": "gc", **removed})
        return removed
