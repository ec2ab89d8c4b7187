"""The model registry on S3: TF Serving's layout plus a manifest per version.

Layout (``../shared/DESIGN.md`` §4)::

    <prefix>/<model>/<version>/saved_model.pb, variables/..., assets.extra/manifest.json
    <prefix>/<model>/_registry/claims/<version>     one per allocated number, never deleted
    <prefix>/<model>/_registry/labels.json          {"stable": 3, "canary": 4}
    <prefix>/<model>/_registry/history/<time>-<id>.json   one object per event

A version is published only when its manifest exists and every file matches it;
the manifest is written last. Version numbers are claimed with a conditional
write (``If-None-Match: *``), so racing publishers never share one, and claims
outlive garbage collection, so a number is never reused.

The S3 protocol itself (retries, conditional writes, manifest last) is
``storage.s3``'s; this module holds the model registry's rules on top of it.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import Field

from storage.layout import MANIFEST, SIGNATURE
from storage.s3 import (
    LocalFile,
    ObjectStore,
    S3Settings,
    StoreAccessDenied,
    StoreError,
    VerificationFailed,
    file_sha256,
    utc_now,
)

__all__ = ["MANIFEST", "ModelStore", "StoreSettings", "StoreError", "StoreAccessDenied", "UnsafeManifest",
           "VerificationFailed", "VersionNotFound", "local_versions", "scan_saved_model"]

LABEL_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class StoreSettings(S3Settings):
    """The model registry's settings: the bucket's, plus which model and how long a
    publish may take before its leftovers are collected."""

    model_name: str = Field("mnist", pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    gc_grace_seconds: float = Field(3600.0, ge=0, description="an unfinished publish older than this is a leftover")


class NothingToRollBack(StoreError):
    """A label with no earlier version to move back to."""


class VersionNotFound(StoreError):
    """No complete version with that number."""


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
        for items in self.leftovers(self.stored_version_dirs()).values():  # what an interrupted publish left
            self.delete_version(items)
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

    def overview(self) -> list[dict[str, Any]]:
        """Every published version with its accuracy (MNIST and per slice), dataset version, labels and time."""
        labels_by_version: dict[int, list[str]] = {}
        for label, version in self.labels().items():
            labels_by_version.setdefault(version, []).append(label)
        rows = []
        for version in self.complete_versions():
            manifest = self.manifest(version)
            metrics = manifest.get("metrics") or {}
            rows.append({"version": version, "test_accuracy": metrics.get("test_accuracy"),
                         "signed": SIGNATURE in (manifest.get("files") or {}),
                         "slices": metrics.get("slices") or {},
                         "dataset_version": (manifest.get("dataset") or {}).get("version"),
                         "labels": sorted(labels_by_version.get(version, [])),
                         "published_at": manifest.get("published_at"), "uri": manifest.get("uri")})
        return rows

    # --- labels and history ------------------------------------------------
    def labels(self) -> dict[str, int]:
        return self.get_json(self.key("_registry", "labels.json")) or {}

    def set_label(self, label: str, version: int | None, event: dict[str, Any] | None = None) -> int | None:
        """Point ``label`` at ``version`` (None removes it), with a compare-and-swap on
        labels.json so concurrent movers never lose an update; returns the previous target."""
        if not LABEL_PATTERN.match(label):
            raise StoreError(f"invalid label {label!r}: use lower-case letters, digits, '-' or '_'")
        if version is not None and version not in self.complete_versions():
            raise VersionNotFound(f"version {version} of {self.uri()} is not published")

        def move(labels: dict[str, int] | None) -> dict[str, int]:
            others = {k: v for k, v in (labels or {}).items() if k != label}
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
        current = self.labels().get(label)
        if current is None:
            raise StoreError(f"nothing to roll back: no {label!r} label in {self.uri()}")
        complete = set(self.complete_versions())
        earlier_targets = [e["version"] for e in self.history()
                           if e.get("event") == "label" and e.get("label") == label and e.get("version") is not None]
        candidates = [v for v in reversed(earlier_targets) if v != current and v in complete and v < current]
        candidates += sorted((v for v in complete if v < current), reverse=True)
        return current, candidates[0] if candidates else None

    def rollback(self, label: str = "stable", event: dict[str, Any] | None = None) -> tuple[int, int]:
        """Point ``label`` at its ``rollback_target``; NothingToRollBack when there is none."""
        current, target = self._rollback_plan(label)
        if target is None:
            raise NothingToRollBack(f"nothing to roll back to: no published version of {self.uri()} before {current}")
        self.set_label(label, target, {"reason": "rollback", **(event or {})})
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

    def gc(self, keep: int, grace_seconds: float | None = None) -> dict[str, list[int]]:
        """Delete complete versions beyond the newest ``keep`` and leftovers of
        interrupted publishes. Never a labelled version, nor the newest complete one."""
        if keep < 1:
            raise StoreError("gc --keep must be at least 1")
        stored = self.stored_version_dirs()
        complete = [v for v, items in stored.items() if self.has_manifest(v, items)]
        protected = set(self.labels().values()) | set(sorted(complete)[-keep:])
        old = sorted(v for v in complete if v not in protected)
        leftovers = self.leftovers(stored, grace_seconds)
        for version in old:
            self.delete_version(stored[version])
        for items in leftovers.values():
            self.delete_version(items)
        removed = {"removed_versions": old, "removed_leftovers": sorted(leftovers)}
        if old or leftovers:
            self.record({"event": "gc", **removed})
        return removed
