"""Log batches the store does not take, kept on local disk (``spool.py``) until it does: the
outage said once at its start and once at its end, a thread that writes spooled batches to the
store oldest first with a capped backoff for as long as the gateway lives, and the batches that
can never be written (a full spool, a refusing disk, a name the store holds with other records)
dropped and counted."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from prometheus_client import Counter

from serving.gateway.spool import Spool, SpoolError
from storage.logs import BatchConflict, LogBatch, PredictionLogStore

log = logging.getLogger("mnist.gateway")
MAX_DRAIN_BACKOFF = 5.0  # the longest wait between two tries of a store that is down, with batches spooled:
# one write tried every 5 s costs nothing, and the spool empties within seconds of the store's return


class SpooledWrites:
    def __init__(self, spool: Spool, store: PredictionLogStore, dropped: Counter,
                 stored: Callable[[LogBatch, str], None], stopping: threading.Event):
        self.spool, self.store, self.dropped, self.stored, self.stopping = spool, store, dropped, stored, stopping
        self.lock = threading.Lock()
        self.more = threading.Event()  # wakes the drain
        self.outage_since: float | None = None  # monotonic time the store first failed a write, while it is down
        self.spool_full = False  # said once each time the spool fills
        self.spool_failing = False  # said once each time its disk refuses a batch
        self.drained = 0  # spooled batches written since the outage began
        self.max_drain_backoff = MAX_DRAIN_BACKOFF
        self.thread = threading.Thread(target=self.drain, name="log-spool-drain", daemon=True)

    def start(self) -> None:
        if self.spool.depth:
            log.warning("%d prediction log batches (%d bytes) wait in the spool %s from before: writing them "
                        "to the store", self.spool.depth, self.spool.used_bytes, self.spool.directory)
        self.thread.start()

    @property
    def waiting(self) -> bool:
        """Whether new batches join the spooled ones (the store is down, or batches wait): the drain
        writes them in order."""
        return self.outage_since is not None or self.spool.depth > 0

    def stop(self, timeout: float) -> None:
        """After ``stopping`` is set: the drain ends its write under way."""
        self.more.set()
        if self.thread.is_alive():
            self.thread.join(timeout=timeout)

    def outage_began(self, error: Exception) -> None:
        with self.lock:
            began, self.outage_since = self.outage_since is None, self.outage_since or time.monotonic()
            if began:
                self.drained = 0
        if began:
            log.warning("log store unavailable: spooling prediction logs to %s until it is back: %s",
                        self.spool.directory, str(error)[:200])

    def written_directly(self, batch: LogBatch) -> bool:
        try:
            key = self.store.write_prepared(batch)
        except Exception:  # noqa: BLE001  still down: the caller drops it and counts it
            return False
        self.stored(batch, key)
        return True

    def put(self, batch: LogBatch) -> None:
        """On local disk until the drain writes it; dropped and counted only when the spool is full
        or the disk refuses it."""
        try:
            spooled = self.spool.put(batch)
        except OSError as error:
            if self.written_directly(batch):  # the store may be back while the drain waits out its backoff
                return
            if not self.spool_failing:
                log.warning("cannot spool prediction logs to %s (%s): dropping them until it takes them or the "
                            "store does", self.spool.directory, error)
            self.spool_failing = True
            self.dropped.labels("spool_error").inc(len(batch.entries))
            return
        self.spool_failing = False
        if not spooled:
            if not self.spool_full:
                log.warning("the log spool %s is full (%d bytes, its bound): dropping prediction logs until "
                            "the store takes some", self.spool.directory, self.spool.used_bytes)
            self.spool_full = True
            self.dropped.labels("spool_full").inc(len(batch.entries))
            return
        self.more.set()

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
            self.more.wait(1.0)
            self.more.clear()

    def drain_once(self) -> bool:
        """Every batch spooled now, written; False at the first the store fails."""
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
                self.dropped.labels("spool_unreadable").inc()
                self.spool.remove(name)
                continue
            try:
                key = self.store.write_prepared(batch)
            except BatchConflict as error:  # never writable: kept, it would hold every batch behind it
                log.warning("dropped a spooled log batch the store can never take: %s", str(error)[:300])
                self.dropped.labels("spool_conflict").inc(len(batch.entries))
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
