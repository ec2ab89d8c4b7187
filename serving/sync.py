"""S3 → local model directory sync: the sidecar beside TF Serving.

TF Serving (>= 2.7) cannot read ``s3://``, and it loads a version directory the
moment one appears. So the sync downloads a version into a hidden staging
directory, verifies every file against the manifest, and only then renames it
to ``<model_base_path>/<version>``: a watcher sees a complete version or none.
It needs only read and list permissions on the bucket.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from storage.models import ModelStore, local_versions

STAGING_PREFIX = ".sync-"


@dataclass
class SyncResult:
    downloaded: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)


def wanted_versions(complete: list[int], labels: dict[str, int]) -> set[int]:
    """The labelled versions and the newest complete one."""
    wanted = {version for version in labels.values() if version in complete}
    if complete:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
    os.replace(handle.name, path)


def download_version(store: ModelStore, version: int, model_base_path: Path) -> None:
    """Verified download into a staging directory, then one atomic rename."""
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{version}-", dir=model_base_path))
    try:
        store.download(version, staging)
        staging.rename(model_base_path / str(version))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_stale_staging(model_base_path: Path) -> None:
    """Staging directories of a sync that was killed: never visible, safe to drop."""
    for leftover in model_base_path.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def sync_once(store: ModelStore, model_base_path: Path, config_file: Path | None = None,
              config_base_path: str | None = None) -> SyncResult:
    """Mirror the wanted versions and write ``models.config``; return what changed."""
    model_base_path.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(model_base_path)
    complete = store.complete_versions()
    labels = store.labels()
    wanted = wanted_versions(complete, labels)
    present = set(local_versions(model_base_path))
    result = SyncResult(labels={k: v for k, v in labels.items() if v in wanted})
    for version in sorted(wanted - present):
        download_version(store, version, model_base_path)
        result.downloaded.append(version)
    serving = sorted(wanted)
    # Write the config before removing anything, so TF Serving stops serving a
    # version (by policy) before its files go away.
    write_atomically(config_file or model_base_path.parent / "models.config",
                     model_config_text(store.settings.model_name, config_base_path or str(model_base_path.resolve()),
                                       serving, result.labels))
    for version in sorted(present - wanted):
        shutil.rmtree(model_base_path / str(version))
        result.removed.append(version)
    result.kept = serving
    return result


def watch(store: ModelStore, model_base_path: Path, interval: float, config_file: Path | None = None,
          config_base_path: str | None = None, report=print) -> None:
    """Sync every ``interval`` seconds; transient store errors are reported and retried next round."""
    from storage.models import StoreAccessDenied, StoreError

    while True:
        try:
            result = sync_once(store, model_base_path, config_file, config_base_path)
            if result.downloaded or result.removed:
                report(f"synced: downloaded {result.downloaded}, removed {result.removed}, serving {result.kept}")
        except StoreAccessDenied:
            raise
        except StoreError as error:
            report(f"sync failed, retrying in {interval:g}s: {error}")
        time.sleep(interval)
