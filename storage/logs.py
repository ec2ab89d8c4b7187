"""Served traffic in the bucket: logged predictions and the feedback on them.

Layout (``docs/feedback-loop.md``, "The served traffic feeds back"), beside the model and dataset stores::

    <prefix>/logs/<model>/<YYYY-MM-DD>/<HHMMSS>-<ms><id>.tfrecord.gz  TF Serving PredictionLog records (TFRecord,
                                                                      GZIP compression type)
    <prefix>/logs/<model>/<YYYY-MM-DD>/<HHMMSS>-<ms><id>.json         written last: the file's sha256, size and
                                                                      compression, and per record its request id,
                                                                      time, version, label
    <prefix>/feedback/<model>/<sha256>.json                     a correct label for one logged image
    <prefix>/feedback/<model>/_ingested/<batch sha256>.json     the feedback a dataset batch was made of: each
                                                                label's basis and callers, and when

A log batch counts only once its index exists (manifest last, as everywhere in the
bucket). PredictionLog has no field for a request id, so the index carries it, in
record order. Nothing read back is trusted: names must match their patterns, the
index must describe exactly the records, the payload its hash. Batches written before logs were
compressed (a ``.tfrecord`` file, no ``compression`` in the index) still read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any, Iterator, TypeGuard

from storage import tfrecord
from storage.s3 import ObjectStore, StoreError, VerificationFailed, utc_now
from storage.settings import TrafficSettings

log = logging.getLogger("mnist.logs")
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
DATE_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}$")
BATCH_PATTERN = re.compile(r"^\d{6}-[0-9a-f]{12}$")
FEEDBACK_PATTERN = re.compile(r"^[0-9a-f]{64}\.json$")
# The most images one logged call can hold: the gateway's 64 MiB message limit at one byte a pixel.
# The writer logs no call above it and the reader takes every entry up to it: they agree.
MAX_LOGGED_EXAMPLES = (64 << 20) // 784
MAX_FEEDBACK_INDEX = MAX_LOGGED_EXAMPLES
# What a reader inflates one log batch to, at most: writers cut batches at 32 MiB, after at most one
# more call of a 64 MiB request and its answer (the gateway's message limit).
MAX_RECORDS_SIZE = 256 << 20


class BatchConflict(StoreError):
    """The store holds other records under a batch's name: writing it again can never succeed."""

    status = "ALREADY_EXISTS"


class LogNotFound(StoreError):
    """No logged request with that id (not sampled, not yet uploaded, unknown or too old)."""

    status = "NOT_FOUND"


@dataclass(frozen=True)
class LogEntry:
    """One logged request, as the batch's index describes it."""

    request_id: str
    time: str  # ISO 8601, UTC
    version: int | None  # the version that answered (None: the call failed)
    label: str  # the label asked for ("" for a version or the latest)
    api: str  # "grpc" or "rest"
    examples: int  # images in the request
    client_request_id: str = ""  # the caller's own x-request-id, if any: never the key feedback addresses
    # (a publish's live check is told apart by it only when it verifies: storage/live_check.py)

    @classmethod
    def checked(cls, raw: Any) -> "LogEntry":
        """An entry read from the bucket, refused unless every field is what the gateway writes
        (entries written before ``client_request_id`` existed lack it)."""
        fields = set(cls.__dataclass_fields__)
        if not isinstance(raw, dict) or set(raw) not in (fields, fields - {"client_request_id"}):
            raise VerificationFailed(f"log index entry has unexpected fields: {str(raw)[:120]}")
        client = raw.get("client_request_id", "")
        if not (isinstance(client, str) and (client == "" or REQUEST_ID_PATTERN.match(client))):
            raise VerificationFailed(f"log index entry is malformed: {str(raw)[:120]}")
        version, examples = raw["version"], raw["examples"]
        if not (isinstance(raw["request_id"], str) and REQUEST_ID_PATTERN.match(raw["request_id"])
                and isinstance(raw["time"], str) and isinstance(raw["label"], str) and len(raw["label"]) <= 64
                and raw["api"] in ("grpc", "rest") and (version is None or type(version) is int)
                and type(examples) is int and 0 <= examples <= MAX_LOGGED_EXAMPLES):
            raise VerificationFailed(f"log index entry is malformed: {str(raw)[:120]}")
        return cls(**raw)


def readable_entries(key: str, raw_entries: list[Any]) -> list[LogEntry | None]:
    """A batch index's entries, each checked on its own: one malformed entry is None (skipped and
    counted by its readers), not a batch that no reader can use."""
    entries: list[LogEntry | None] = []
    for raw in raw_entries:
        try:
            entries.append(LogEntry.checked(raw))
        except VerificationFailed as error:
            log.warning("%s: %s; skipped", key, error)
            entries.append(None)
    return entries


def new_request_id() -> str:
    return uuid.uuid4().hex


def valid_request_id(value: str | None) -> TypeGuard[str]:
    return value is not None and bool(REQUEST_ID_PATTERN.match(value))


def day_folders(since: datetime, now: datetime | None = None) -> list[str]:
    """The day folders a rolling window from ``since`` (UTC) to now touches, newest first: the one
    rule of ``mnist logs``, feedback look-ups and the drift flow."""
    now = now or datetime.now(timezone.utc)
    return days_back(max((now.date() - since.date()).days + 1, 1), now.date())


def hours_ago(hours: float) -> datetime:
    return datetime.now(timezone.utc) - timedelta(hours=hours)


def days_back(days: int, today: date | None = None) -> list[str]:
    today = today or datetime.now(timezone.utc).date()
    return [(today - timedelta(days=offset)).isoformat() for offset in range(days)]


@dataclass(frozen=True)
class LogBatch:
    """One log batch as it will be stored: its day folder and name, decided once (so every write
    of it goes to the same keys), the GZIP TFRecord payload and the index entries, in record order."""

    folder: str
    name: str
    payload: bytes
    records_size: int  # the TFRecord bytes before compression
    entries: tuple[LogEntry, ...]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.payload).hexdigest()


def prepare_batch(entries: list[LogEntry], records: list[tfrecord.Pieces]) -> LogBatch:
    """The records, each given as its pieces, encoded, and the batch's name: the first call's
    second, then its millisecond before 9 random hex digits, so names sort oldest first."""
    if len(entries) != len(records) or not entries:
        raise ValueError("a log batch needs one entry per record, and at least one")
    payload, framed_size = tfrecord.encode_gzipped(records)  # a tenth of the bytes to send, hash, store
    stamp = datetime.fromisoformat(entries[0].time)
    name = f"{stamp:%H%M%S}-{stamp.microsecond // 1000:03d}{uuid.uuid4().hex[:9]}"
    return LogBatch(stamp.date().isoformat(), name, payload, framed_size, tuple(entries))


class PredictionLogStore(ObjectStore):
    """One model's logged predictions, in day folders of batches."""

    def __init__(self, settings: TrafficSettings, client: Any = None):
        super().__init__(settings, "/".join(p for p in (settings.s3_prefix.strip("/"), "logs", settings.model_name)
                                            if p), client)

    def write_batch(self, entries: list[LogEntry], records: list[tfrecord.Pieces]) -> str:
        """The records, each given as its pieces (checked on receipt), then their index: the batch
        exists from that write on. Returns the index's key."""
        return self.write_prepared(prepare_batch(entries, records))

    def write_prepared(self, batch: LogBatch) -> str:
        """A batch whose name was decided before (``prepare_batch``), payload then index; returns
        the index's key. Writing the same batch again is a no-op, so a writer that died between
        this and forgetting the batch (a spool file not yet removed) duplicates nothing."""
        payload_key = self.key(batch.folder, f"{batch.name}.tfrecord.gz")
        if not self.put_new(payload_key, batch.payload, batch.sha256):
            raise BatchConflict(f"{payload_key} already holds other records ({self.where})")
        index = {"file": {"sha256": batch.sha256, "size": len(batch.payload), "compression": tfrecord.GZIP,
                          "records_size": batch.records_size},
                 "records": [asdict(entry) for entry in batch.entries], "written_at": utc_now()}
        key = self.key(batch.folder, f"{batch.name}.json")
        if not self.put_new(key, json.dumps(index, indent=2, sort_keys=True).encode()):  # as write_manifest
            before = self.get_json(key)  # written before; the same batch unless the index says otherwise
            if not (isinstance(before, dict) and before.get("file") == index["file"]
                    and before.get("records") == index["records"]):
                raise BatchConflict(f"{key} already indexes another batch ({self.where})")
        return key

    def batch_keys(self, days: list[str]) -> list[str]:
        """Index keys of the complete batches of the given day folders, oldest first."""
        keys = []
        for day in sorted(d for d in days if DATE_PATTERN.match(d)):
            prefix = self.key(day, "")
            for item in self.list_keys(prefix):
                name = item["Key"][len(prefix):]
                if name.endswith(".json") and BATCH_PATTERN.match(name[:-5]):
                    keys.append(item["Key"])
        return sorted(keys)

    def checked_key(self, key: str) -> str:
        """A batch index key read from elsewhere (a feedback object), refused unless it is one of ours."""
        prefix = self.key("")
        day, _, name = key[len(prefix):].partition("/") if key.startswith(prefix) else ("", "", "")
        if not (DATE_PATTERN.match(day) and name.endswith(".json") and BATCH_PATTERN.match(name[:-5])):
            raise VerificationFailed(f"{key[:200]!r} is not a log batch of {self.uri()}")
        return key

    def read_index(self, key: str) -> tuple[dict[str, Any], list[LogEntry | None]]:
        """A batch's index and its entries; a malformed entry is None (see ``readable_entries``)."""
        index = self.get_json(self.checked_key(key))
        payload = index.get("file") if isinstance(index, dict) else None
        if not isinstance(index.get("records") if isinstance(index, dict) else None, list) \
                or not isinstance(payload, dict) or type(payload.get("size")) is not int \
                or not re.fullmatch(r"[0-9a-f]{64}", str(payload.get("sha256"))):
            raise VerificationFailed(f"{key}: not a log batch index")
        if "compression" in payload and not (payload["compression"] == tfrecord.GZIP
                                             and type(payload.get("records_size")) is int
                                             and 0 < payload["records_size"] <= MAX_RECORDS_SIZE):
            raise VerificationFailed(f"{key}: compression {str(payload['compression'])[:20]!r} of "
                                     f"{str(payload.get('records_size'))[:20]} bytes is not one this store reads")
        return index, readable_entries(key, index["records"])

    def read_batch(self, key: str) -> list[tuple[LogEntry | None, bytes]]:
        """(entry, serialized PredictionLog) for every record, verified against the index; an entry
        the index holds malformed is None, its record kept in place (positions are what feedback names)."""
        index, entries = self.read_index(key)
        file = index["file"]
        compressed = "compression" in file  # GZIP, read_index made sure
        payload = self.fetch_verified(key.removesuffix(".json") + (".tfrecord.gz" if compressed else ".tfrecord"),
                                      file, key)
        try:
            records = list(tfrecord.decode(tfrecord.gunzipped(payload, file["records_size"]) if compressed
                                           else payload))
        except tfrecord.TFRecordError as error:
            raise VerificationFailed(f"{key}: {error}") from None
        if len(records) != len(entries):
            raise VerificationFailed(f"{key}: {len(records)} records but {len(entries)} index entries")
        return list(zip(entries, records))

    def find(self, request_id: str, hours: float) -> tuple[str, int, LogEntry]:
        """(index key, position, entry) of a request logged within the last ``hours`` hours."""
        if not valid_request_id(request_id):
            raise LogNotFound(f"{request_id!r} is not a request id (1-128 of A-Z a-z 0-9 . _ : -)")
        since = hours_ago(hours)
        for key in reversed(self.batch_keys(day_folders(since))):
            for position, entry in enumerate(self.read_index(key)[1]):
                if entry and entry.request_id == request_id and datetime.fromisoformat(entry.time) >= since:
                    return key, position, entry
        raise LogNotFound(f"request {request_id} is not in the prediction logs of the last {hours:g} hours "
                          "(not sampled for logging, not yet uploaded, or unknown)")

    def window(self, since: datetime) -> Iterator[tuple[LogEntry, bytes]]:
        """Every logged record since ``since`` (UTC), batch by batch."""
        for key in self.batch_keys(day_folders(since)):
            for entry, record in self.read_batch(key):
                if entry and datetime.fromisoformat(entry.time) >= since:
                    yield entry, record


def feedback_name(request_id: str, index: int, caller: str) -> str:
    """The object name of one caller's label for one image: a hash, never the caller's string itself.
    One object per caller, so no caller's label replaces another's."""
    return hashlib.sha256(f"{request_id}#{index}#{caller}".encode()).hexdigest() + ".json"


# what the feedback policy made of a label; "held": the screen moved it to the data quarantine
INGESTED_BASES = ("trusted", "agreed", "overruled", "held")
CALLER_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


@dataclass(frozen=True)
class IngestedLabel:
    """One label an ``_ingested`` record names. ``basis``: one of ``INGESTED_BASES``, else
    "unknown" (a record from before bases were recorded, or one that says something else);
    ``callers``: the callers it rested on, () when they do not read."""

    request_id: str
    index: int
    label: int
    basis: str
    callers: tuple[str, ...]

    @classmethod
    def checked(cls, raw: Any) -> "IngestedLabel | None":
        """The entry, or None when not even which label it names reads."""
        if not (isinstance(raw, dict) and isinstance(raw.get("request_id"), str)
                and REQUEST_ID_PATTERN.match(raw["request_id"])
                and type(raw.get("index")) is int and 0 <= raw["index"] < MAX_FEEDBACK_INDEX
                and type(raw.get("label")) is int and 0 <= raw["label"] <= 9):
            return None
        callers = raw.get("callers")
        if not (isinstance(callers, list) and 0 < len(callers) <= 1000
                and all(isinstance(c, str) and CALLER_PATTERN.match(c) for c in callers)):
            callers = []
        basis = raw.get("basis")
        return cls(raw["request_id"], raw["index"], raw["label"], basis if basis in INGESTED_BASES else "unknown",
                   tuple(callers))


@dataclass(frozen=True)
class IngestRecord:
    """One ``_ingested`` record as read back: when (its own time, else the object's; None when
    neither reads), the labels it names, and how many of its entries did not read (None: the
    record itself did not, so how many labels it admitted is unknown)."""

    time: datetime | None
    labels: tuple[IngestedLabel, ...] = ()
    unreadable: int | None = 0

    @classmethod
    def checked(cls, raw: Any, last_modified: Any = None) -> "IngestRecord":
        stamp = aware(raw.get("time")) if isinstance(raw, dict) else None
        time = stamp or (last_modified if isinstance(last_modified, datetime) else None)
        entries = raw.get("feedback") if isinstance(raw, dict) else None
        if not isinstance(entries, list):
            return cls(time, (), None)
        labels = [IngestedLabel.checked(entry) for entry in entries]
        return cls(time, tuple(label for label in labels if label), labels.count(None))


def ingest_record(feedback: list[dict[str, Any]], batch_sha256: str | None, time: datetime | None = None
                  ) -> dict[str, Any]:
    """An ``_ingested`` record as written: each label with its basis and callers, and the time."""
    items = [{**{key: item[key] for key in ("request_id", "index", "label", "basis")},
              "callers": list(item["callers"])} for item in feedback]
    return {"batch": batch_sha256, "feedback": items,  # to the microsecond: the window's edge is where it says
            "time": (time or datetime.now(timezone.utc)).isoformat(timespec="microseconds")}


def aware(value: Any) -> datetime | None:
    """An ISO 8601 time read back, in UTC when it names no zone; None when it is not one."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


class FeedbackStore(ObjectStore):
    """Correct labels for logged requests, waiting to become a dataset batch."""

    def __init__(self, settings: TrafficSettings, client: Any = None):
        super().__init__(settings, "/".join(p for p in (settings.s3_prefix.strip("/"), "feedback",
                                                        settings.model_name) if p), client)

    def put(self, feedback: dict[str, Any]) -> str:
        """Store (or correct: that caller's latest label wins) one caller's label for one logged image."""
        key = self.key(feedback_name(feedback["request_id"], feedback["index"], feedback["caller"]))
        self.call(self.client.put_object, Bucket=self.bucket, Key=key,
                  Body=json.dumps(feedback, sort_keys=True).encode())
        return key

    def all(self) -> list[dict[str, Any]]:
        prefix = self.key("")
        return [self.get_json(item["Key"]) for item in self.list_keys(prefix)
                if FEEDBACK_PATTERN.match(item["Key"][len(prefix):])]

    def ingest_records(self) -> list[IngestRecord]:
        """Every ``_ingested`` record, read back as the untrusted bucket's data it is: a record or
        an entry that does not read is said so (``IngestRecord``), never a crash of the ingest."""
        records = []
        for item in self.list_keys(self.key("_ingested", "")):
            try:
                raw = self.get_json(item["Key"])
            except (ValueError, RecursionError):
                raw = "not JSON"  # a record that does not read: how much it admitted is unknown
            if raw is not None:  # None: removed since it was listed
                records.append(IngestRecord.checked(raw, item.get("LastModified")))
        return records

    def ingested(self, records: list[IngestRecord] | None = None) -> set[tuple[str, int, int]]:
        """(request id, index, label) of every feedback already turned into a batch."""
        return {(label.request_id, label.index, label.label)
                for record in (self.ingest_records() if records is None else records) for label in record.labels}

    def mark_ingested(self, feedback: list[dict[str, Any]], batch_sha256: str | None,
                      time: datetime | None = None) -> None:
        """Record what a batch was made of (None: nothing new, every image a known one): each
        label with its ``basis`` and the ``callers`` it rests on, and when (now unless told), which
        the feedback policy's window budgets count."""
        self.put_new(self.key("_ingested", f"{batch_sha256 or 'none-' + uuid.uuid4().hex}.json"),
                     json.dumps(ingest_record(feedback, batch_sha256, time)).encode())
