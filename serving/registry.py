"""The model store on S3: TF Serving's layout plus a manifest per version.

Layout (``../shared/DESIGN.md`` §4)::

    <prefix>/<model>/<version>/saved_model.pb, variables/..., assets.extra/manifest.json
    <prefix>/<model>/_registry/claims/<version>     one per allocated number, never deleted
    <prefix>/<model>/_registry/labels.json          {"stable": 3, "canary": 4}
    <prefix>/<model>/_registry/history/<time>-<id>.json   one object per event

A version is published only when its manifest exists and every file matches it;
the manifest is written last. Version numbers are claimed with a conditional
write (``If-None-Match: *``), so racing publishers never share one, and claims
outlive garbage collection, so a number is never reused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import boto3
import botocore.config
import botocore.exceptions
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MANIFEST = "assets.extra/manifest.json"
LABEL_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
                   "RequestTimeTooSkewed"}
DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
                "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed", "Forbidden"}
T = TypeVar("T")


class StoreSettings(BaseSettings):
    """Where the model store is. Credentials come the standard boto3 way
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE / AWS_REGION), never from here."""

    model_config = SettingsConfigDict(env_prefix="MNIST_", extra="ignore")

    s3_endpoint: str | None = None  # unset: AWS S3 itself (or the embedded store, from the CLI)
    s3_bucket: str = Field("mnist-models", min_length=3, max_length=63)
    s3_prefix: str = "models"
    model_name: str = Field("mnist", pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    retry_seconds: float = Field(60.0, ge=0, le=3600, description="give up on transient errors after this")
    gc_grace_seconds: float = Field(3600.0, ge=0, description="an unfinished publish older than this is a leftover")


class StoreError(RuntimeError):
    """The store refused or failed an operation; the message names endpoint and bucket."""


class StoreAccessDenied(StoreError):
    """Wrong credentials or missing permission: never retried."""


class VersionNotFound(StoreError):
    """No complete version with that number."""


class VerificationFailed(StoreError):
    """A stored file does not match the manifest."""


@dataclass(frozen=True)
class LocalFile:
    relative: str
    path: Path
    sha256: str
    size: int


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    """Integer version directories under ``model_dir``: TF Serving's layout on disk."""
    if not model_dir.is_dir():
        return []
    return sorted(int(entry.name) for entry in model_dir.iterdir() if entry.is_dir() and entry.name.isdigit())


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def error_code(error: botocore.exceptions.ClientError) -> tuple[str, int]:
    return (error.response.get("Error", {}).get("Code", ""),
            int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)))


def is_transient(error: Exception) -> bool:
    if isinstance(error, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError,
                          botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError)):
        return True
    if isinstance(error, botocore.exceptions.ClientError):
        code, status = error_code(error)
        return status >= 500 or code in TRANSIENT_CODES
    return False


def is_denied(error: Exception) -> bool:
    if isinstance(error, botocore.exceptions.ClientError):
        code, status = error_code(error)
        return code in DENIED_CODES or status == 403
    return isinstance(error, botocore.exceptions.NoCredentialsError)


def is_precondition_failed(error: Exception) -> bool:
    return isinstance(error, botocore.exceptions.ClientError) and error_code(error)[1] == 412


def is_missing(error: Exception) -> bool:
    return isinstance(error, botocore.exceptions.ClientError) and (
        error_code(error)[1] == 404 or error_code(error)[0] in {"NoSuchKey", "NotFound", "NoSuchBucket"})


class ModelStore:
    """One model's versions, labels and history in an S3 bucket."""

    def __init__(self, settings: StoreSettings, client: Any = None):
        self.settings = settings
        # A fresh session per store: boto3's default one caches the credentials it first found.
        self.client = client or boto3.session.Session().client(
            "s3", endpoint_url=settings.s3_endpoint,
            config=botocore.config.Config(
                retries={"total_max_attempts": 1},  # retries are ours: see call()
                connect_timeout=5, read_timeout=30,
                # path-style for custom endpoints (MinIO, SeaweedFS); AWS itself picks its own
                s3={"addressing_style": "path" if settings.s3_endpoint else "auto"},
                request_checksum_calculation="when_required", response_checksum_validation="when_required"))
        self.bucket = settings.s3_bucket
        self.root = "/".join(part for part in (settings.s3_prefix.strip("/"), settings.model_name) if part)

    # --- plumbing ---------------------------------------------------------
    @property
    def where(self) -> str:
        return f"endpoint {self.settings.s3_endpoint or 'AWS S3'}, bucket {self.bucket}"

    def uri(self, version: int | None = None) -> str:
        base = f"s3://{self.bucket}/{self.root}"
        return base if version is None else f"{base}/{version}"

    def http_url(self, version: int) -> str:
        """A browser link to the version's manifest (path-style on custom endpoints)."""
        key = self.key(version, MANIFEST)
        if self.settings.s3_endpoint:
            return f"{self.settings.s3_endpoint.rstrip('/')}/{self.bucket}/{key}"
        return f"https://{self.bucket}.s3.amazonaws.com/{key}"

    def key(self, *parts: object) -> str:
        return "/".join([self.root, *(str(p) for p in parts)])

    def call(self, operation: Callable[..., T], **kwargs: Any) -> T:
        """Run one S3 call: retry transient faults with backoff, fail fast on denial."""
        deadline = time.monotonic() + self.settings.retry_seconds
        delay = 0.2
        while True:
            try:
                return operation(**kwargs)
            except Exception as error:  # classified below; anything else propagates
                if is_denied(error):
                    raise StoreAccessDenied(f"access denied by S3 ({self.where}): {error}") from None
                if not is_transient(error):
                    raise
                if time.monotonic() + delay > deadline:
                    raise StoreError(f"S3 unreachable ({self.where}): {error}") from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def ensure_bucket(self) -> None:
        try:
            self.call(self.client.head_bucket, Bucket=self.bucket)
        except botocore.exceptions.ClientError as error:
            if not is_missing(error):
                raise StoreError(f"cannot use bucket ({self.where}): {error}") from None
            region = self.client.meta.region_name
            extra = ({"CreateBucketConfiguration": {"LocationConstraint": region}}
                     if region and region != "us-east-1" else {})
            try:
                self.call(self.client.create_bucket, Bucket=self.bucket, **extra)
            except botocore.exceptions.ClientError as create_error:
                if error_code(create_error)[0] not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise StoreError(f"cannot create bucket ({self.where}): {create_error}") from None

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self.call(self.client.get_object, Bucket=self.bucket, Key=key)["Body"].read()
        except botocore.exceptions.ClientError as error:
            if is_missing(error):
                return None
            raise

    def get_json(self, key: str) -> Any:
        raw = self.get_bytes(key)
        return None if raw is None else json.loads(raw)

    def list_keys(self, prefix: str) -> Iterator[dict[str, Any]]:
        token: dict[str, str] = {}
        while True:
            try:
                page = self.call(self.client.list_objects_v2, Bucket=self.bucket, Prefix=prefix, **token)
            except botocore.exceptions.ClientError as error:
                if error_code(error)[0] == "NoSuchBucket":
                    return  # a store nobody has published to yet is empty
                raise
            yield from page.get("Contents", [])
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def put_new(self, key: str, body: bytes) -> bool:
        """Create ``key`` only if absent; False if it already exists. Safe to retry:
        a retried write that finds its own earlier bytes counts as written."""
        try:
            self.call(self.client.put_object, Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
            return True
        except botocore.exceptions.ClientError as error:
            if is_precondition_failed(error):
                return self.get_bytes(key) == body
            raise

    def put_checked(self, key: str, body: bytes, sha256_hex: str) -> None:
        """Upload with a SHA-256 the server checks on receipt (BadDigest otherwise)."""
        checksum = base64.b64encode(bytes.fromhex(sha256_hex)).decode()
        self.call(self.client.put_object, Bucket=self.bucket, Key=key, Body=body, ChecksumSHA256=checksum)

    # --- versions ---------------------------------------------------------
    def claimed_versions(self) -> list[int]:
        prefix = self.key("_registry", "claims", "")
        return sorted(int(item["Key"][len(prefix):]) for item in self.list_keys(prefix)
                      if item["Key"][len(prefix):].isdigit())

    def claim_version(self, details: dict[str, Any]) -> int:
        """Allocate the next number with a conditional write; racing publishers get distinct ones."""
        token = uuid.uuid4().hex
        while True:
            version = max(self.claimed_versions(), default=0) + 1
            body = json.dumps({"version": version, "token": token, "claimed_at": utc_now(), **details}).encode()
            if self.put_new(self.key("_registry", "claims", version), body):
                return version

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

    def publish(self, directory: Path, metadata: dict[str, Any]) -> dict[str, Any]:
        """Upload a SavedModel as the next version; returns its manifest.

        Order: claim the number, upload variables, assets and saved_model.pb
        with server-checked SHA-256s, read every object back and compare, then
        write the manifest, which makes the version visible.
        """
        files = scan_saved_model(directory)
        entries = {f.relative: {"sha256": f.sha256, "size": f.size} for f in files}
        self.ensure_bucket()
        for items in self.leftovers(self.stored_version_dirs()).values():  # what an interrupted publish left
            self.delete_version(items)
        version = self.claim_version({"source": str(directory), "flow_run_id": metadata.get("flow_run_id")})
        for item in files:
            self.put_checked(self.key(version, item.relative), item.path.read_bytes(), item.sha256)
        self.verify_files(version, entries)
        manifest = {**metadata, "model_name": self.settings.model_name, "version": version,
                    "uri": self.uri(version), "published_at": utc_now(), "files": entries}
        if not self.put_new(self.key(version, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode()):
            raise StoreError(f"version {version} already has a manifest ({self.where})")
        return manifest

    def fetch_verified(self, version: int, relative: str, expected: dict[str, Any]) -> bytes:
        """One file's bytes, checked against its manifest entry (size and SHA-256)."""
        raw = self.get_bytes(self.key(version, relative))
        if raw is None:
            raise VerificationFailed(f"version {version}: {relative} is missing")
        digest = hashlib.sha256(raw).hexdigest()
        if len(raw) != expected["size"] or digest != expected["sha256"]:
            raise VerificationFailed(f"version {version}: {relative} does not match the manifest "
                                     f"(size {len(raw)} vs {expected['size']}, sha256 {digest[:12]}…)")
        return raw

    def verify_files(self, version: int, files: dict[str, dict[str, Any]]) -> None:
        """Download every file and compare it with the manifest; raise naming the first mismatch."""
        for relative, expected in files.items():
            self.fetch_verified(version, relative, expected)

    def verify(self, version: int) -> dict[str, Any]:
        manifest = self.manifest(version)
        self.verify_files(version, manifest["files"])
        return manifest

    def download(self, version: int, destination: Path) -> dict[str, Any]:
        """Download a complete version, checking every file against its manifest."""
        manifest = self.manifest(version)
        for relative, expected in manifest["files"].items():
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.fetch_verified(version, relative, expected))
        manifest_path = destination / MANIFEST
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return manifest

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
        key = self.key("_registry", "labels.json")
        while True:
            try:
                current = self.call(self.client.get_object, Bucket=self.bucket, Key=key)
                labels, condition = json.loads(current["Body"].read()), {"IfMatch": current["ETag"]}
            except botocore.exceptions.ClientError as error:
                if not is_missing(error):
                    raise
                labels, condition = {}, {"IfNoneMatch": "*"}
            previous = labels.get(label)
            updated = {**labels, label: version} if version is not None else {
                k: v for k, v in labels.items() if k != label}
            try:
                self.call(self.client.put_object, Bucket=self.bucket, Key=key,
                          Body=json.dumps(updated, sort_keys=True).encode(), **condition)
            except botocore.exceptions.ClientError as error:
                if is_precondition_failed(error):
                    continue  # someone else moved a label meanwhile: re-read and retry
                raise
            self.record({"event": "label", "label": label, "version": version, "previous": previous,
                         **(event or {})})
            return previous

    def record(self, event: dict[str, Any]) -> None:
        """Append an event to the history: one new object each, so writers never collide."""
        entry = {"time": utc_now(), **event}
        name = f"{entry['time'].replace(':', '')}-{uuid.uuid4().hex[:8]}.json"
        self.put_new(self.key("_registry", "history", name), json.dumps(entry, sort_keys=True).encode())

    def history(self) -> list[dict[str, Any]]:
        prefix = self.key("_registry", "history", "")
        return [self.get_json(item["Key"]) for item in sorted(self.list_keys(prefix), key=lambda i: i["Key"])]

    def rollback(self, label: str = "stable", event: dict[str, Any] | None = None) -> tuple[int, int]:
        """Point ``label`` at the version it pointed to before the current one
        (or, without such a record, the newest complete version below it)."""
        current = self.labels().get(label)
        if current is None:
            raise StoreError(f"nothing to roll back: no {label!r} label in {self.uri()}")
        complete = set(self.complete_versions())
        earlier_targets = [e["version"] for e in self.history()
                           if e.get("event") == "label" and e.get("label") == label and e.get("version") is not None]
        candidates = [v for v in reversed(earlier_targets) if v != current and v in complete and v < current]
        candidates += sorted((v for v in complete if v < current), reverse=True)
        if not candidates:
            raise StoreError(f"nothing to roll back to: no published version of {self.uri()} before {current}")
        target = candidates[0]
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
        for item in sorted(items, key=lambda i: not i["Key"].endswith(MANIFEST)):
            self.call(self.client.delete_object, Bucket=self.bucket, Key=item["Key"])

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
