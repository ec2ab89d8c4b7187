"""S3 → local model directory sync: the sidecar beside TF Serving.

TF Serving (>= 2.7) cannot read ``s3://``, and it loads a version directory the
moment one appears. So the sync downloads a version into a hidden staging
directory, verifies every file against the manifest, and only then renames it
to ``<model_base_path>/<version>``: a watcher sees a complete version or none.
It needs only read and list permissions on the bucket.

A write the model directory refuses (disk full, quota, read-only, a failing disk) is a failed
attempt like a store outage: the staging it left is removed, ``watch`` says it in one line and
tries again with a capped backoff, for as long as it runs, so freeing the space is all it takes.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from mnist_client.client import Target, wait_until_available

# the client's generated copy of TF Serving's config proto: the sidecar installs without TensorFlow
from mnist_client.protos import model_server_config_pb2
from serving.protocol.tf_serving_protos import read_text_proto
from storage.errors import MnistError
from storage.models import ModelStore, VerificationFailed, local_versions
from storage.signing import verify_directory

STAGING_PREFIX = ".sync-"
MAX_RETRY_SECONDS = 60.0  # the longest wait between failed attempts of ``watch`` (unless --interval is longer)
# errors of the local disk that make a write fail and pass once someone frees space or fixes the mount
LOCAL_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM}


@dataclass
class SyncResult:
    downloaded: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    labels_pending: bool = False  # a label waits for its version to load (moved on a later round)
    refused: dict[int, str] = field(default_factory=dict)  # version -> why it was not exposed


class SyncError(MnistError, RuntimeError):
    """A sync attempt failed (the server did not load a version in time, or a local write failed)."""


class LocalWriteError(SyncError):
    """The model directory refused a write; nothing half-written is left behind. ``behind`` says
    how the served config lags the registry meanwhile ("" when it does not, or is not known)."""

    behind = ""


def local_write_error(error: OSError, doing: str) -> LocalWriteError:
    """One line: what failed ("no space left on device") and where."""
    what = (error.strerror or type(error).__name__).lower()
    named = [str(name) for name in (error.filename, error.filename2) if name]
    return LocalWriteError(f"{what} {doing}" + (f" ({' -> '.join(named)})" if named else ""))


def local_cause(error: Exception) -> OSError | None:
    """The local disk's error behind ``error``: the store's ``open_new`` turns any OSError into an
    UnsafeManifest refusal (raised from None, so only ``__context__`` keeps it); a full disk is no
    unsafe manifest, and must be retried, not refused."""
    cause = error if isinstance(error, OSError) else error.__context__
    return cause if isinstance(cause, OSError) and cause.errno in LOCAL_WRITE_ERRNOS else None


def wanted_versions(complete: list[int], labels: dict[str, int]) -> set[int]:
    """The labelled versions; the newest complete one only while no label names a version.

    TF Serving answers a request that names no version or label with the newest version it
    serves, and most clients name none. Serving only the labelled versions makes a rollback or a
    failed live check (which move ``stable`` back) reach those clients too, instead of leaving
    them on the newer version the label left."""
    wanted = {version for version in labels.values() if version in complete}
    if not wanted and complete:
        wanted.add(max(complete))
    return wanted


def model_config_text(model_name: str, base_path: str, versions: list[int], labels: dict[str, int]) -> str:
    """A TF Serving ``models.config`` serving exactly ``versions``, with ``version_labels``."""
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = model_name
    model.base_path = base_path
    model.model_platform = "tensorflow"
    model.model_version_policy.specific.versions.extend(sorted(versions))
    for label, version in sorted(labels.items()):
        if version in versions:
            model.version_labels[label] = version
    return text_format.MessageToString(config)


def write_atomically(path: Path, text: str) -> None:
    """Write a scratch file beside ``path`` and rename it over; a failed write (a full disk) removes
    its scratch file, so retries leave nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        scratch = Path(handle.name)
        try:
            handle.write(text)
            handle.flush()
        except BaseException:
            scratch.unlink(missing_ok=True)
            raise
    try:
        os.replace(scratch, path)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise


def download_version(store: ModelStore, version: int, model_base_path: Path, verify_key: Path | None = None) -> None:
    """Verified download into a staging directory (its signature checked when ``verify_key``
    is given), then one atomic rename. A write the disk refuses: LocalWriteError, the staging gone."""
    staging: Path | None = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{version}-", dir=model_base_path))
        store.download(version, staging)
        if verify_key is not None:
            verify_directory(staging, verify_key, f"version {version}")
        staging.rename(model_base_path / str(version))
    except BaseException as error:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        cause = error if isinstance(error, OSError) else local_cause(error) if isinstance(error, Exception) else None
        if cause is None:
            raise
        raise local_write_error(cause, f"writing version {version} into {model_base_path}") from None


def remove_stale_staging(model_base_path: Path) -> None:
    """Staging directories of a sync that was killed: never visible, safe to drop."""
    for leftover in model_base_path.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def served_config(config_file: Path) -> tuple[set[int], dict[str, int]]:
    """The versions and labels of the config written last (what the server was told), or nothing."""
    try:
        config = read_text_proto(config_file, model_server_config_pb2.ModelServerConfig())
    except ValueError:
        return set(), {}
    models = config.model_config_list.config
    if not models:
        return set(), {}
    return set(models[0].model_version_policy.specific.versions), dict(models[0].version_labels)


def next_config(wanted: set[int], labels: dict[str, int], listed_before: set[int], labelled_before: dict[str, int],
                present: set[int]) -> tuple[set[int], dict[str, int], bool]:
    """The versions and labels to write now, and whether a label move still waits.

    TF Serving refuses a label on a version that is not AVAILABLE (server_core.cc
    ``UpdateModelVersionLabelMap``), so a label moves only to a version an earlier config
    already listed; until then it stays where it was, and that version stays too."""
    ready = {label: version for label, version in labels.items() if version in listed_before}
    waiting = {label: labelled_before[label] for label in labels
               if label not in ready and labelled_before.get(label) in present}
    return wanted | set(waiting.values()), {**ready, **waiting}, len(ready) < len(labels)


def sync_once(store: ModelStore, model_base_path: Path, config_file: Path | None = None,
              config_base_path: str | None = None, server: Target | None = None,
              load_timeout: float = 300.0, verify_key: Path | None = None) -> SyncResult:
    """Mirror the wanted versions and write ``models.config``; return what changed.

    A label moves in two steps, as real TF Serving needs: first a config that lists the
    new version with the labels where they were, then, once the version is AVAILABLE
    (asked of ``server`` with GetModelStatus; without one, on the next round), the move.
    A write the model directory refuses raises LocalWriteError."""
    config_file = config_file or model_base_path.parent / "models.config"
    try:
        return sync_round(store, model_base_path, config_file, config_base_path, server, load_timeout, verify_key)
    except OSError as error:  # making the directory, writing the config, removing an old version
        raise local_write_error(error, f"syncing into {model_base_path}") from None


def behind_registry(labels: dict[str, int], config_file: Path) -> str:
    """How the labels the server was last told lag the registry's, in a few words ("" if not)."""
    _, told = served_config(config_file)
    lagging = sorted(label for label, version in labels.items() if told.get(label) != version)
    return ", ".join(f"the registry says {label}={labels[label]}, the server is told "
                     f"{label}={told.get(label, 'nothing')}" for label in lagging)


def sync_round(store: ModelStore, model_base_path: Path, config_file: Path, config_base_path: str | None,
               server: Target | None, load_timeout: float, verify_key: Path | None) -> SyncResult:
    model_base_path.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(model_base_path)
    for scratch in config_file.parent.glob(f".{config_file.name}.*"):  # a config write a kill cut short
        scratch.unlink(missing_ok=True)
    base_path = config_base_path or str(model_base_path.resolve())
    # Labels first: each names a version complete when it was set, and gc retires no labelled
    # version. A label whose version this listing lacks stays where the server has it this round
    # (next_config), never dropped: a config without stable fails every call that asks for it.
    labels = store.labels()
    complete = store.complete_versions()
    wanted = wanted_versions(complete, labels)
    present = set(local_versions(model_base_path))
    result = SyncResult()
    for version in sorted(wanted - present):
        try:
            download_version(store, version, model_base_path, verify_key)
        except VerificationFailed as refusal:  # not exposed; the other versions still sync
            result.refused[version] = str(refusal)
            continue
        except LocalWriteError as error:
            error.behind = behind_registry(labels, config_file)
            raise
        result.downloaded.append(version)
    present |= set(result.downloaded)
    wanted -= set(result.refused)
    listed_before, labelled_before = served_config(config_file)
    versions, written_labels, waiting = next_config(wanted, labels, listed_before, labelled_before, present)
    try:
        write_config(config_file, store.settings.model_name, base_path, versions, written_labels)
    except OSError as error:
        failed = local_write_error(error, f"writing {config_file}")
        failed.behind = behind_registry(labels, config_file)
        raise failed from None
    if waiting and server is not None:
        states = wait_until_available(server, sorted(wanted), load_timeout)
        if any(states.get(version) != "AVAILABLE" for version in wanted):
            ended = sorted(version for version in wanted if states.get(version) == "END")
            why = (f"version(s) {ended} ended without becoming AVAILABLE (a failed load: the server's "
                   "GetModelStatus says why)" if ended else f"not AVAILABLE within {load_timeout:g}s")
            raise SyncError(f"versions {sorted(wanted)} at {server.address}: {why} (states {states}); "
                            "labels stay where they were")
        versions, written_labels, waiting = next_config(wanted, labels, versions, written_labels, present)
        write_config(config_file, store.settings.model_name, base_path, versions, written_labels)
    # The config goes first, so TF Serving stops serving a version (by policy) before its files go away.
    for version in sorted(present - versions):
        shutil.rmtree(model_base_path / str(version))
        result.removed.append(version)
    result.kept, result.labels, result.labels_pending = sorted(versions), written_labels, waiting
    return result


def write_config(config_file: Path, model_name: str, base_path: str, versions: set[int],
                 labels: dict[str, int]) -> None:
    write_atomically(config_file, model_config_text(model_name, base_path, sorted(versions), labels))


def retry_delay(interval: float, failures: int) -> float:
    """Seconds before the next attempt after ``failures`` failed ones in a row: ``interval``,
    doubling, capped at MAX_RETRY_SECONDS (or ``interval``, if that is longer)."""
    return min(max(interval, MAX_RETRY_SECONDS), interval * 2.0 ** max(failures - 1, 0))


def watch(store: ModelStore, model_base_path: Path, interval: float, config_file: Path | None = None,
          config_base_path: str | None = None, server: Target | None = None, load_timeout: float = 300.0,
          verify_key: Path | None = None, report=print) -> None:
    """Sync every ``interval`` seconds, for as long as it runs: a store outage, a slow load or a
    write the disk refuses is said in one line and retried with a capped backoff (``retry_delay``).
    Only denied access ends it: a configuration fault that no retry mends."""
    from storage.models import StoreAccessDenied, StoreError

    failures = 0
    while True:
        try:
            result = sync_once(store, model_base_path, config_file, config_base_path, server, load_timeout,
                               verify_key)
        except StoreAccessDenied:
            raise
        except (StoreError, SyncError) as error:
            failures += 1
            delay = retry_delay(interval, failures)
            behind = f" ({error.behind})" if isinstance(error, LocalWriteError) and error.behind else ""
            report(f"sync incomplete: {error}; retrying in {delay:g}s{behind}")
            time.sleep(delay)
            continue
        if failures:
            report(f"sync recovered after {failures} failed attempt{'s' if failures > 1 else ''}")
            failures = 0
        if result.downloaded or result.removed:
            report(f"synced: downloaded {result.downloaded}, removed {result.removed}, serving {result.kept}, "
                   f"labels {result.labels}")
        for reason in result.refused.values():
            report(f"refused: {reason}")
        time.sleep(interval)
