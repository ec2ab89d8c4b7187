"""S3 primitives that every registry in the bucket stands on.

One ``ObjectStore`` is a bucket plus a root prefix. It knows nothing about
models or datasets; it gives them what S3 lacks and they need:

- retries of transient faults with backoff, denial failing at once (``call``);
- conditional create (``put_new``, ``If-None-Match: *``) and compare-and-swap of a
  JSON document (``update_json``, ``If-Match`` on the ETag);
- never-reused numbers claimed by conditional writes (``claim_number``);
  every registry keeps ``<root>/_registry/claims/<n>`` and ``<root>/_registry/history/``;
- uploads the server checks on receipt, read back and compared, with the
  manifest written last so a reader sees all of an item or nothing
  (``upload_verified``, ``write_manifest``), streamed in both directions with
  boto3's managed transfers, hashing as they go (``upload_file``, ``stream_verified``);
- append-only event history, one object per event (``record``, ``history``);
- the multipart uploads a killed writer left unfinished (``unfinished_uploads``, ``abort_upload``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, TypeVar

import boto3
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from storage.errors import MnistError
from storage.settings import S3Settings

TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
                   "RequestTimeTooSkewed"}
DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
                "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed", "Forbidden"}
T = TypeVar("T")
CHUNK_BYTES = 1 << 20
# Multipart above 64 MiB, 8 MiB parts, 4 at a time: at most about 32 MiB of a file in memory.
TRANSFER = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=8 << 20, max_concurrency=4,
                          use_threads=True)


class StoreError(MnistError, RuntimeError):
    """The store refused or failed an operation; the message names endpoint and bucket."""

    status = "UNAVAILABLE"


class StoreAccessDenied(StoreError):
    """Wrong credentials or missing permission: never retried."""

    status = "PERMISSION_DENIED"


class VerificationFailed(StoreError):
    """A stored file does not match the manifest."""

    status = "DATA_LOSS"


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


def s3_client(settings: S3Settings) -> Any:
    # A fresh session per store: boto3's default one caches the credentials it first found.
    return boto3.session.Session().client(
        "s3", endpoint_url=settings.s3_endpoint,
        config=botocore.config.Config(
            retries={"total_max_attempts": 1},  # retries are ours: see ObjectStore.call()
            connect_timeout=5, read_timeout=30,
            # path-style for custom endpoints (MinIO, SeaweedFS); AWS itself picks its own
            s3={"addressing_style": "path" if settings.s3_endpoint else "auto"},
            request_checksum_calculation="when_required", response_checksum_validation="when_required"))


def long_lived_secret() -> str | None:
    """The secret access key ``s3_client``'s clients sign with, found the same standard boto3 way;
    None without credentials, or with temporary ones (a session token: roles rotate them)."""
    credentials = boto3.session.Session().get_credentials()
    if credentials is None:
        return None
    frozen = credentials.get_frozen_credentials()
    return None if frozen.token or not frozen.secret_key else frozen.secret_key


class ObjectStore:
    """A bucket and a root prefix, with the crash-safe primitives the registries share."""

    def __init__(self, settings: S3Settings, root: str, client: Any = None):
        self.settings = settings
        # Told once per call, at its first transient fault, what is happening (the CLI prints it).
        self.on_retry: Callable[[str], None] | None = None
        self.client = client or s3_client(settings)
        self.bucket = settings.s3_bucket
        self.root = root.strip("/")

    # --- addressing -------------------------------------------------------
    @property
    def where(self) -> str:
        return f"endpoint {self.settings.s3_endpoint or 'AWS S3'}, bucket {self.bucket}"

    def key(self, *parts: object) -> str:
        return "/".join([self.root, *(str(p) for p in parts)])

    def uri(self, *parts: object) -> str:
        return f"s3://{self.bucket}/{self.key(*parts)}" if parts else f"s3://{self.bucket}/{self.root}"

    # --- calls --------------------------------------------------------------
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
                if delay == 0.2 and self.on_retry is not None:
                    self.on_retry(f"S3 unreachable ({self.where}); retrying for up to "
                                  f"{self.settings.retry_seconds:g} s (MNIST_RETRY_SECONDS)")
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
                    return  # a store nobody has written to yet is empty
                raise
            yield from page.get("Contents", [])
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def delete_keys(self, keys: list[str]) -> None:
        for key in keys:
            self.call(self.client.delete_object, Bucket=self.bucket, Key=key)

    # --- multipart uploads nobody finished ----------------------------------
    def unfinished_uploads(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Multipart uploads under ``prefix`` neither completed nor aborted (a writer killed
        mid-upload leaves one; its parts take space but are in no listing of objects)."""
        markers: dict[str, str] = {}
        while True:
            try:
                page = self.call(self.client.list_multipart_uploads, Bucket=self.bucket, Prefix=prefix, **markers)
            except botocore.exceptions.ClientError as error:
                if error_code(error)[0] == "NoSuchBucket":
                    return
                raise
            yield from page.get("Uploads", [])
            if not page.get("IsTruncated"):
                return
            markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def abort_upload(self, upload: dict[str, Any]) -> bool:
        """Abort one of ``unfinished_uploads``; False if it was finished or aborted meanwhile."""
        try:
            self.call(self.client.abort_multipart_upload, Bucket=self.bucket, Key=upload["Key"],
                      UploadId=upload["UploadId"])
            return True
        except botocore.exceptions.ClientError as error:
            if error_code(error)[0] == "NoSuchUpload" or is_missing(error):
                return False
            raise

    # --- conditional writes -----------------------------------------------
    def put_new(self, key: str, body: bytes, sha256_hex: str | None = None) -> bool:
        """Create ``key`` only if absent; False if it already exists. Safe to retry:
        a retried write that finds its own earlier bytes counts as written. With the body's
        ``sha256_hex``, the server verifies it on receipt."""
        extra = {"ChecksumSHA256": base64.b64encode(bytes.fromhex(sha256_hex)).decode()} if sha256_hex else {}
        try:
            self.call(self.client.put_object, Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*", **extra)
            return True
        except botocore.exceptions.ClientError as error:
            if is_precondition_failed(error):
                return self.get_bytes(key) == body
            raise

    def update_json(self, key: str, change: Callable[[Any], Any]) -> tuple[Any, Any]:
        """Compare-and-swap a JSON document: ``change(current or None)`` gives the new one,
        retried on a concurrent write so no update is lost. Returns (before, after)."""
        while True:
            try:
                current = self.call(self.client.get_object, Bucket=self.bucket, Key=key)
                before, condition = json.loads(current["Body"].read()), {"IfMatch": current["ETag"]}
            except botocore.exceptions.ClientError as error:
                if not is_missing(error):
                    raise
                before, condition = None, {"IfNoneMatch": "*"}
            after = change(before)
            try:
                self.call(self.client.put_object, Bucket=self.bucket, Key=key,
                          Body=json.dumps(after, sort_keys=True).encode(), **condition)
                return before, after
            except botocore.exceptions.ClientError as error:
                if not is_precondition_failed(error):
                    raise  # else someone else wrote meanwhile: re-read and retry

    def claimed_numbers(self) -> list[int]:
        prefix = self.key("_registry", "claims", "")
        return sorted(int(item["Key"][len(prefix):]) for item in self.list_keys(prefix)
                      if item["Key"][len(prefix):].isdigit())

    def claim_number(self, details: dict[str, Any]) -> int:
        """Allocate the next number (a version) with a conditional write of
        ``_registry/claims/<n>``: racing writers get distinct ones, and claims are
        never deleted, so no number is ever reused."""
        token = uuid.uuid4().hex
        while True:
            number = max(self.claimed_numbers(), default=0) + 1
            body = json.dumps({"number": number, "token": token, "claimed_at": utc_now(), **details}).encode()
            if self.put_new(self.key("_registry", "claims", number), body):
                return number

    # --- streaming transfers -----------------------------------------------
    def upload_file(self, key: str, path: Path, sha256_hex: str) -> None:
        """Stream a file up without holding it in memory. Up to the multipart threshold one
        PUT with the whole file's SHA-256, which the server checks on receipt; above it
        boto3's managed multipart upload with a SHA-256 per part, each checked on receipt."""
        if path.stat().st_size <= TRANSFER.multipart_threshold:
            checksum = base64.b64encode(bytes.fromhex(sha256_hex)).decode()

            def put() -> None:
                with path.open("rb") as body:  # reopened on every retry: the body starts again
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ChecksumSHA256=checksum)
            self.call(put)
        else:
            self.call(self.client.upload_file, Filename=str(path), Bucket=self.bucket, Key=key, Config=TRANSFER,
                      ExtraArgs={"ChecksumAlgorithm": "SHA256"})

    def stream_verified(self, key: str, expected: dict[str, Any], name: str, sink: BinaryIO | None = None) -> None:
        """Read an object in chunks, hashing as it streams (into ``sink`` when given), and
        compare size and SHA-256 with its manifest entry; never the whole object in memory."""
        def read() -> tuple[int, str]:
            if sink is not None:
                sink.seek(0)
                sink.truncate()
            digest, size = hashlib.sha256(), 0
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            for chunk in body.iter_chunks(CHUNK_BYTES):
                digest.update(chunk)
                size += len(chunk)
                if sink is not None:
                    sink.write(chunk)
            return size, digest.hexdigest()
        try:
            size, digest = self.call(read)
        except botocore.exceptions.ClientError as error:
            if is_missing(error):
                raise VerificationFailed(f"{name} is missing") from None
            raise
        if size != expected["size"] or digest != expected["sha256"]:
            raise VerificationFailed(f"{name} does not match the manifest "
                                     f"(size {size} vs {expected['size']}, sha256 {digest[:12]}…)")

    # --- items written manifest last --------------------------------------
    def fetch_verified(self, key: str, expected: dict[str, Any], name: str) -> bytes:
        """One object's bytes, checked against its manifest entry (size and SHA-256), for
        objects that are used whole anyway (a dataset batch's payload)."""
        buffer = io.BytesIO()
        self.stream_verified(key, expected, name, buffer)
        return buffer.getvalue()

    def upload_verified(self, prefix: str, files: list[LocalFile]) -> dict[str, dict[str, Any]]:
        """Upload ``files`` in order under ``prefix`` with server-checked SHA-256s, read each
        back and compare; returns the manifest's ``files`` entries."""
        entries = {f.relative: {"sha256": f.sha256, "size": f.size} for f in files}
        for item in files:
            self.upload_file(f"{prefix}/{item.relative}", item.path, item.sha256)
        for relative, expected in entries.items():
            self.stream_verified(f"{prefix}/{relative}", expected, relative)
        return entries

    def write_manifest(self, key: str, manifest: dict[str, Any]) -> None:
        """The last write of an item: from this moment readers see it, complete."""
        if not self.put_new(key, json.dumps(manifest, indent=2, sort_keys=True).encode()):
            raise StoreError(f"{key} already has a manifest ({self.where})")

    # --- history ------------------------------------------------------------
    def record(self, event: dict[str, Any]) -> None:
        """Append an event to ``_registry/history/``: one new object each, so writers never collide."""
        entry = {"time": utc_now(), **event}
        name = f"{entry['time'].replace(':', '')}-{uuid.uuid4().hex[:8]}.json"
        self.put_new(self.key("_registry", "history", name), json.dumps(entry, sort_keys=True).encode())

    def history(self) -> list[dict[str, Any]]:
        prefix = self.key("_registry", "history", "")
        return [self.get_json(item["Key"]) for item in sorted(self.list_keys(prefix), key=lambda i: i["Key"])]
