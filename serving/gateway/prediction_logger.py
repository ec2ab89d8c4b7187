"""Sampled prediction logging that never blocks or fails a request.

The gateway hands each sampled call to ``PredictionLogger.offer``, which only puts it on a
queue bounded in calls and in bytes (a full queue drops the record and counts it: a store that is
down must not grow the gateway past its memory limit). One background thread turns
calls into TF Serving ``PredictionLog`` records and writes them in batches to the store
(``storage/logs.py``). With a spool (``spool.py``), a batch the store does not take goes to local
disk, and a drain thread writes spooled batches to the store, oldest first, with a capped backoff,
for as long as the gateway lives; without one, or with the spool full, it is dropped and counted.
The requests it came from were answered long before. ``close`` flushes within a deadline and
spools what is left.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from mnist_client._generated.tensorflow_serving.apis import logging_pb2, predict_pb2
from serving.gateway.spool import Spool, SpoolError
from storage.logs import MAX_LOGGED_EXAMPLES, BatchConflict, LogBatch, LogEntry, PredictionLogStore, prepare_batch

log = logging.getLogger("mnist.gateway")
LEDGER_SECONDS = 0.5  # how stale the ledger's count of unwritten calls may be
REMEMBERED_IDS = 100_000  # ids kept in memory: where a logged one went, that an unlogged one was answered
MAX_DRAIN_BACKOFF = 5.0  # the longest wait between two tries of a store that is down, with batches spooled:
# one write tried every 5 s costs nothing, and the spool empties within seconds of the store's return


@dataclass
class Call:
    """One answered Predict, as the gateway saw it. gRPC: the parsed request (its model spec and
    size), the version that answered and both messages' bytes as they crossed the wire (logged
    as they are, never re-encoded). REST: the JSON bodies and the path's model spec in ``rest``."""

    request_id: str
    api: str  # "grpc" or "rest"
    request: predict_pb2.PredictRequest | None = None
    request_bytes: bytes = b""
    response_bytes: bytes = b""
    version: int | None = None
    rest: dict[str, Any] | None = None
    time: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    client_request_id: str = ""  # the caller's own id, kept beside the gateway's

    @property
    def size(self) -> int:
        """Bytes of messages the call holds while it waits to be written."""
        rest = self.rest or {}
        return (len(self.request_bytes) + len(self.response_bytes) + len(rest.get("request") or b"")
                + len(rest.get("response") or b""))


class Unloggable(ValueError):
    """A call that cannot be written as a PredictionLog (e.g. a REST body of another shape)."""


class LoggerMetrics:
    def __init__(self, registry: CollectorRegistry, depth: Callable[[], int], queued_bytes: Callable[[], int],
                 spool: Spool | None = None):
        self.queue_depth = Gauge("mnist_gateway_log_queue_depth", "Sampled calls waiting to be written.",
                                 registry=registry)
        self.queue_depth.set_function(depth)
        self.queue_bytes = Gauge("mnist_gateway_log_queue_bytes", "Bytes of messages waiting to be written.",
                                 registry=registry)
        self.queue_bytes.set_function(queued_bytes)
        self.dropped = Counter("mnist_gateway_logs_dropped", "Sampled calls not written, by reason.", ("reason",),
                               registry=registry)
        self.written = Counter("mnist_gateway_logs_written", "PredictionLog records written to the store.",
                               registry=registry)
        self.sampled = Counter("mnist_gateway_logs_sampled", "Calls sampled for logging.", registry=registry)
        if spool is not None:
            spooled = Gauge("mnist_gateway_log_spool_batches", "Log batches on local disk waiting for the store.",
                            registry=registry)
            spooled.set_function(lambda: spool.depth)
            spooled_bytes = Gauge("mnist_gateway_log_spool_bytes", "Bytes of log batches on local disk waiting "
                                  "for the store.", registry=registry)
            spooled_bytes.set_function(lambda: spool.used_bytes)


class Ledger:
    """The count of sampled calls not yet written, kept in a small file, so that the next start can
    say what a kill lost. The queue lives in memory: SIGKILL or an OOM kill loses it, and nothing
    in the dying process can write it out; the count is at most ``LEDGER_SECONDS`` old."""

    def __init__(self, path: Path):
        self.path = path

    def previous_loss(self) -> dict[str, Any] | None:
        """What the last gateway on this file left unwritten when it died, or None after a clean stop."""
        try:
            last = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(last, dict) or last.get("clean") is not False or type(last.get("unwritten")) is not int:
            return None
        return last if last["unwritten"] > 0 else None

    def save(self, unwritten: int, clean: bool) -> None:
        state = {"pid": os.getpid(), "unwritten": unwritten, "clean": clean, "time": datetime.now(timezone.utc)
                 .isoformat(timespec="seconds")}
        scratch = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            scratch.write_text(json.dumps(state))
            os.replace(scratch, self.path)
        except OSError as error:
            log.warning("cannot keep the log ledger %s: %s", self.path, error)


class PredictionLogger:
    def __init__(self, store: PredictionLogStore, sample_rate: float, registry: CollectorRegistry,
                 to_messages: Callable[[Call], tuple[predict_pb2.PredictRequest, predict_pb2.PredictResponse]],
                 queue_size: int = 10_000, batch_records: int = 256, flush_seconds: float = 5.0,
                 batch_bytes: int = 32 << 20, queue_bytes: int = 256 << 20, ledger: Ledger | None = None,
                 spool: Spool | None = None):
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample rate {sample_rate}: must be within 0-1")
        self.store, self.sample_rate, self.to_messages = store, sample_rate, to_messages
        self.batch_records, self.flush_seconds, self.batch_bytes = batch_records, flush_seconds, batch_bytes
        self.queue: queue.Queue[Call] = queue.Queue(maxsize=queue_size)
        self.queue_bytes = queue_bytes  # a batch-256 call is about a megabyte: 10,000 of them would be 10 GB
        self.queued_bytes = 0
        self.spool = spool
        self.metrics = LoggerMetrics(registry, self.queue.qsize, lambda: self.queued_bytes, spool)
        self.uploaded: OrderedDict[str, str] = OrderedDict()  # request id -> index key of its batch
        self.unsampled: OrderedDict[str, None] = OrderedDict()  # answered, not sampled
        self.written_records = 0
        self.unwritten = 0  # offered and not yet written or dropped: what a kill would lose
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="prediction-logger", daemon=True)
        self.ledger = ledger
        self.ledger_thread = threading.Thread(target=self.keep_ledger, name="log-ledger", daemon=True)
        self.drain_thread = threading.Thread(target=self.drain, name="log-spool-drain", daemon=True)
        self.spooled_more = threading.Event()  # wakes the drain
        self.outage_since: float | None = None  # monotonic time the store first failed a write, while it is down
        self.spool_full = False  # said once each time the spool fills
        self.spool_failing = False  # said once each time its disk refuses a batch
        self.in_flight: LogBatch | None = None  # the batch the writer is sending now
        self.drained = 0  # spooled batches written since the outage began
        self.max_drain_backoff = MAX_DRAIN_BACKOFF

    def start(self) -> "PredictionLogger":
        if self.ledger:
            lost = self.ledger.previous_loss()
            if lost:
                self.metrics.dropped.labels("killed").inc(lost["unwritten"])
                log.warning("the previous gateway (pid %s) stopped without writing its queue: %d sampled calls "
                            "were lost (its count at %s)", lost.get("pid"), lost["unwritten"], lost.get("time"))
            self.ledger.save(0, clean=False)
            self.ledger_thread.start()
        if self.spool:
            if self.spool.depth:
                log.warning("%d prediction log batches (%d bytes) wait in the spool %s from before: writing them "
                            "to the store", self.spool.depth, self.spool.used_bytes, self.spool.directory)
            self.drain_thread.start()
        self.thread.start()
        return self

    def keep_ledger(self) -> None:
        """Started only with a ledger."""
        while self.ledger is not None and not self.stopping.wait(LEDGER_SECONDS):
            self.ledger.save(self.unwritten, clean=False)

    # --- the request path: cheap, never raises ---------------------------------------
    def sampled(self) -> bool:
        return self.sample_rate > 0 and (self.sample_rate >= 1 or random.random() < self.sample_rate)

    def offer(self, call: Call) -> None:
        self.metrics.sampled.inc()
        size = call.size
        with self.lock:
            room = self.queued_bytes + size <= self.queue_bytes
            if room:
                self.queued_bytes += size
        if room:
            try:
                self.queue.put_nowait(call)
                with self.lock:
                    self.unwritten += 1
                return
            except queue.Full:
                self.unqueued(size)
        self.metrics.dropped.labels("queue_full").inc()

    def unqueued(self, size: int) -> None:
        with self.lock:
            self.queued_bytes -= size

    def skipped(self, request_id: str) -> None:
        with self.lock:
            remember(self.unsampled, request_id, None)

    # --- lookups for feedback ---------------------------------------------------------
    def where(self, request_id: str) -> str | None:
        with self.lock:
            return self.uploaded.get(request_id)

    def was_unsampled(self, request_id: str) -> bool:
        with self.lock:
            return request_id in self.unsampled

    # --- the background writer ---------------------------------------------------------
    def run(self) -> None:
        while not (self.stopping.is_set() and self.queue.empty()):
            batch = self.collect(time.monotonic() + self.flush_seconds)
            if batch:
                self.write(batch)

    def collect(self, deadline: float) -> list[Call]:
        """Calls for one log object: up to ``batch_records`` of them, about ``batch_bytes`` of
        messages, or what arrived before ``deadline``."""
        batch: list[Call] = []
        size = 0
        while len(batch) < self.batch_records and size < self.batch_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.stopping.is_set() and self.queue.empty()):
                break
            try:
                call = self.queue.get(timeout=min(remaining, 0.1))
            except queue.Empty:
                continue
            held = call.size
            self.unqueued(held)
            batch.append(call)
            size += held
        return batch

    def record(self, call: Call) -> tuple[LogEntry, list[bytes]]:
        if call.rest is not None:  # REST: TF Serving's messages built from the JSON
            request, response = self.to_messages(call)
            call.request, call.version = request, response.model_spec.version.value
            call.request_bytes, call.response_bytes = request.SerializeToString(), response.SerializeToString()
        if call.request is None:
            raise ValueError("a gRPC call without its parsed request")
        spec = call.request.model_spec
        examples = examples_in(call.request)
        if examples > MAX_LOGGED_EXAMPLES:  # no reader would take its entry: not logged, and counted
            raise Unloggable(f"{examples} images, more than the {MAX_LOGGED_EXAMPLES} a log entry holds")
        entry = LogEntry(call.request_id, call.time.isoformat(timespec="milliseconds"), call.version,
                         spec.version_label, call.api, examples, call.client_request_id)
        metadata = logging_pb2.LogMetadata()
        metadata.model_spec.CopyFrom(spec)  # as asked (a label, a version or neither)
        if entry.version is not None and not spec.version_label:
            metadata.model_spec.version.value = entry.version  # the answer says which, too
        metadata.sampling_config.sampling_rate = self.sample_rate
        metadata.timestamp_secs = int(call.time.timestamp())
        return entry, prediction_log(metadata.SerializeToString(), call.request_bytes, call.response_bytes)

    def write(self, calls: list[Call], spool_only: bool = False) -> None:
        try:
            self.write_batch(calls, spool_only)
        finally:
            with self.lock:
                self.unwritten -= len(calls)

    def write_batch(self, calls: list[Call], spool_only: bool = False) -> None:
        entries: list[LogEntry] = []
        records: list[Sequence[bytes]] = []
        for call in calls:
            try:
                entry, record = self.record(call)
            except Exception as error:  # noqa: BLE001  one odd call must not lose the batch
                log.warning("request %s not logged: %s", call.request_id, error)
                self.metrics.dropped.labels("unloggable").inc()
                continue
            entries.append(entry)
            records.append(record)
        if not records:
            return
        batch = prepare_batch(entries, records)
        if self.spool and (spool_only or self.outage_since is not None or self.spool.depth):  # the drain sends it
            self.to_spool(batch)
            return
        self.in_flight = batch
        try:
            key = self.store.write_prepared(batch)
        except Exception as error:  # noqa: BLE001  the store being down costs logs, never requests
            if self.spool is None:
                log.warning("dropped %d prediction logs: store unavailable: %s", len(records), str(error)[:200])
                self.metrics.dropped.labels("store_error").inc(len(records))
                return
            self.outage_began(error)
            self.to_spool(batch)
            return
        finally:
            self.in_flight = None
        self.stored(batch, key)

    def stored(self, batch: LogBatch, key: str) -> None:
        self.metrics.written.inc(len(batch.entries))
        self.written_records += len(batch.entries)
        with self.lock:
            for entry in batch.entries:
                remember(self.uploaded, entry.request_id, key)

    # --- the spool ------------------------------------------------------------------------
    def outage_began(self, error: Exception) -> None:
        with self.lock:
            began, self.outage_since = self.outage_since is None, self.outage_since or time.monotonic()
            if began:
                self.drained = 0
        if began and self.spool:
            log.warning("log store unavailable: spooling prediction logs to %s until it is back: %s",
                        self.spool.directory, str(error)[:200])

    def written_directly(self, batch: LogBatch) -> bool:
        try:
            key = self.store.write_prepared(batch)
        except Exception:  # noqa: BLE001  still down: the caller drops it and counts it
            return False
        self.stored(batch, key)
        return True

    def to_spool(self, batch: LogBatch) -> None:
        """On local disk until the drain writes it; dropped and counted only when the spool is full
        or the disk refuses it."""
        assert self.spool is not None
        try:
            spooled = self.spool.put(batch)
        except OSError as error:
            if self.written_directly(batch):  # the store may be back while the drain waits out its backoff
                return
            if not self.spool_failing:
                log.warning("cannot spool prediction logs to %s (%s): dropping them until it takes them or the "
                            "store does", self.spool.directory, error)
            self.spool_failing = True
            self.metrics.dropped.labels("spool_error").inc(len(batch.entries))
            return
        self.spool_failing = False
        if not spooled:
            if not self.spool_full:
                log.warning("the log spool %s is full (%d bytes, its bound): dropping prediction logs until "
                            "the store takes some", self.spool.directory, self.spool.used_bytes)
            self.spool_full = True
            self.metrics.dropped.labels("spool_full").inc(len(batch.entries))
            return
        self.spooled_more.set()

    def drain(self) -> None:
        """Write spooled batches to the store, oldest first, for as long as the gateway lives; a store
        that fails is tried again after 1, 2, 4 ... MAX_DRAIN_BACKOFF seconds."""
        delay = min(1.0, self.max_drain_backoff)
        while not self.stopping.is_set():
            if not self.drain_once():
                self.stopping.wait(delay)
                delay = min(delay * 2, self.max_drain_backoff)
                continue
            delay = min(1.0, self.max_drain_backoff)
            self.spooled_more.wait(1.0)
            self.spooled_more.clear()

    def drain_once(self) -> bool:
        """Every batch spooled now, written; False at the first the store fails."""
        assert self.spool is not None
        for name in self.spool.names():
            if self.stopping.is_set():
                return True
            try:
                batch = self.spool.read(name)
            except FileNotFoundError:  # another gateway on this spool wrote it
                self.spool.remove(name)
                continue
            except (SpoolError, OSError) as error:
                log.warning("dropped a spooled log batch that does not read: %s", str(error)[:300])
                self.metrics.dropped.labels("spool_unreadable").inc()
                self.spool.remove(name)
                continue
            try:
                key = self.store.write_prepared(batch)
            except BatchConflict as error:  # never writable: kept, it would hold every batch behind it
                log.warning("dropped a spooled log batch the store can never take: %s", str(error)[:300])
                self.metrics.dropped.labels("spool_conflict").inc(len(batch.entries))
                self.spool.remove(name)
                continue
            except Exception as error:  # noqa: BLE001  a store still down: the file stays, tried again later
                self.outage_began(error)
                return False
            self.spool.remove(name)  # after the write: a crash between them writes it again, to the same keys
            self.stored(batch, key)
            self.drained += 1
        self.spool_full = False
        with self.lock:
            since, self.outage_since = self.outage_since, None if not self.spool.depth else self.outage_since
        if since is not None and self.outage_since is None:
            log.warning("log store back after %.0f s: %d spooled batches of prediction logs written, the spool "
                        "is empty", time.monotonic() - since, self.drained)
        return True

    def close(self, deadline_seconds: float) -> None:
        """Write what is queued, within the deadline; what is left then goes to the spool (without
        one, it is dropped and counted). Spooled batches stay for the next start."""
        self.flush_seconds = 0.05
        self.stopping.set()
        self.spooled_more.set()
        self.thread.join(timeout=deadline_seconds)
        left: list[Call] = []
        while True:
            try:
                left.append(self.queue.get_nowait())
            except queue.Empty:
                break
            self.unqueued(left[-1].size)
        in_flight = self.in_flight if self.thread.is_alive() else None
        if self.spool and (left or in_flight):
            if in_flight:  # still being sent: spooled too, the same keys, so it is written once either way
                self.to_spool(in_flight)
            if left:
                self.spool_calls(left)
            log.warning("spooled %d prediction logs at shutdown (deadline %gs) to %s",
                        len(left) + len(in_flight.entries if in_flight else ()), deadline_seconds,
                        self.spool.directory)
        elif left:
            with self.lock:
                self.unwritten -= len(left)
            self.metrics.dropped.labels("shutdown").inc(len(left))
            log.warning("dropped %d prediction logs at shutdown (deadline %gs)", len(left), deadline_seconds)
        if self.drain_thread.is_alive():
            self.drain_thread.join(timeout=5.0)
        if self.ledger:
            self.ledger.save(0, clean=True)  # nothing left that a next start should count as lost

    def spool_calls(self, calls: list[Call]) -> None:
        for start in range(0, len(calls), self.batch_records):
            self.write(calls[start:start + self.batch_records], spool_only=True)


def remember(ids: OrderedDict, request_id: str, value: Any) -> None:
    ids[request_id] = value
    ids.move_to_end(request_id)
    while len(ids) > REMEMBERED_IDS:
        ids.popitem(last=False)


def request_outline(request: predict_pb2.PredictRequest) -> predict_pb2.PredictRequest:
    """The request's model spec and its inputs' types and shapes, not their values: what a log
    index needs, where the parsed request would hold a second copy of the payload while it waits."""
    outline = predict_pb2.PredictRequest()
    outline.model_spec.CopyFrom(request.model_spec)
    for name, tensor in request.inputs.items():
        outline.inputs[name].dtype = tensor.dtype
        outline.inputs[name].tensor_shape.CopyFrom(tensor.tensor_shape)
    return outline


def examples_in(request: predict_pb2.PredictRequest) -> int:
    """Images in a request: the first dimension of its (first) input."""
    for tensor in request.inputs.values():
        dims = tensor.tensor_shape.dim
        return int(dims[0].size) if dims else 1
    return 0


# PredictionLog's wire format, written around the messages' own bytes: re-encoding a logged request
# of 256 images through message objects costs three times as much CPU, beside the requests, and
# joining the pieces into one bytes object copies the megabyte twice more; the log file is written
# from the pieces. Fields: PredictionLog.log_metadata = 1, .predict_log = 6; PredictLog.request = 1,
# .response = 2.
def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def field_header(number: int, size: int) -> bytes:
    """A length-delimited field's tag and length, which ``size`` bytes of payload follow."""
    return varint(number << 3 | 2) + varint(size)


def prediction_log(metadata: bytes, request: bytes, response: bytes) -> list[bytes]:
    """A serialized PredictionLog with a PredictLog of the given (serialized) messages, as the
    pieces it is the concatenation of."""
    request_field, response_field = field_header(1, len(request)), field_header(2, len(response))
    predict_log_size = len(request_field) + len(request) + len(response_field) + len(response)
    return [field_header(1, len(metadata)) + metadata + field_header(6, predict_log_size) + request_field,
            request, response_field, response]
