"""Sampled prediction logging that never blocks or fails a request.

The gateway hands each sampled call to ``PredictionLogger.offer``, which only puts it on a
queue bounded in calls and in bytes (a full queue drops the record and counts it: a store that is
down must not grow the gateway past its memory limit). One background thread turns
calls into TF Serving ``PredictionLog`` records (``log_records.py``) and writes them in batches to
the store (``storage/logs.py``). With a spool, a batch the store does not take waits on local disk
until it does (``spooled_writes.py``); without one it is dropped and counted.
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from mnist_client.protos import predict_pb2
from serving.gateway.log_records import Call, log_record
from serving.gateway.spool import Spool
from serving.gateway.spooled_writes import SpooledWrites
from storage.logs import LogBatch, LogEntry, PredictionLogStore, prepare_batch

log = logging.getLogger("mnist.gateway")
LEDGER_SECONDS = 0.5  # how stale the ledger's count of unwritten calls may be
REMEMBERED_IDS = 100_000  # ids kept in memory: where a logged one went, that an unlogged one was answered


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
        self.spooled = (SpooledWrites(spool, store, self.metrics.dropped, self.stored, self.stopping)
                        if spool is not None else None)
        self.in_flight: LogBatch | None = None  # the batch the writer is sending now

    def start(self) -> "PredictionLogger":
        if self.ledger:
            lost = self.ledger.previous_loss()
            if lost:
                self.metrics.dropped.labels("killed").inc(lost["unwritten"])
                log.warning("the previous gateway (pid %s) stopped without writing its queue: %d sampled calls "
                            "were lost (its count at %s)", lost.get("pid"), lost["unwritten"], lost.get("time"))
            self.ledger.save(0, clean=False)
            self.ledger_thread.start()
        if self.spooled:
            self.spooled.start()
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
                entry, record = log_record(call, self.sample_rate, self.to_messages)
            except Exception as error:  # noqa: BLE001  one odd call must not lose the batch
                log.warning("request %s not logged: %s", call.request_id, error)
                self.metrics.dropped.labels("unloggable").inc()
                continue
            entries.append(entry)
            records.append(record)
        if not records:
            return
        batch = prepare_batch(entries, records)
        if self.spooled and (spool_only or self.spooled.waiting):  # the drain sends it
            self.spooled.put(batch)
            return
        self.in_flight = batch
        try:
            key = self.store.write_prepared(batch)
        except Exception as error:  # noqa: BLE001  the store being down costs logs, never requests
            if self.spooled is None:
                log.warning("dropped %d prediction logs: store unavailable: %s", len(records), str(error)[:200])
                self.metrics.dropped.labels("store_error").inc(len(records))
                return
            self.spooled.outage_began(error)
            self.spooled.put(batch)
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

    def close(self, deadline_seconds: float) -> None:
        """Write what is queued, within the deadline; what is left then goes to the spool (without
        one, it is dropped and counted). Spooled batches stay for the next start."""
        self.flush_seconds = 0.05
        self.stopping.set()
        self.thread.join(timeout=deadline_seconds)
        left: list[Call] = []
        while True:
            try:
                left.append(self.queue.get_nowait())
            except queue.Empty:
                break
            self.unqueued(left[-1].size)
        in_flight = self.in_flight if self.thread.is_alive() else None
        if self.spooled and (left or in_flight):
            if in_flight:  # still being sent: spooled too, the same keys, so it is written once either way
                self.spooled.put(in_flight)
            if left:
                self.spool_calls(left)
            log.warning("spooled %d prediction logs at shutdown (deadline %gs) to %s",
                        len(left) + len(in_flight.entries if in_flight else ()), deadline_seconds,
                        self.spooled.spool.directory)
        elif left:
            with self.lock:
                self.unwritten -= len(left)
            self.metrics.dropped.labels("shutdown").inc(len(left))
            log.warning("dropped %d prediction logs at shutdown (deadline %gs)", len(left), deadline_seconds)
        if self.spooled:
            self.spooled.stop(timeout=5.0)
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
