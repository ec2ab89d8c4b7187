"""Prediction-log batches the store could not take yet, on local disk until it can.

One file a batch, ``<day>_<name>.batch``: a line of JSON (the store it is for, its index entries,
the payload's size and SHA-256) and then the batch's GZIP TFRecord payload, exactly the bytes the
store gets. The batch's name (its keys in the store) is decided before it is spooled, so uploading
it twice writes the same objects (``PredictionLogStore.write_prepared``): a crash between the
upload and the file's removal duplicates nothing. A file is written under a scratch name, fsynced,
and renamed into place; a reader sees a whole batch or none. Nothing in the directory is trusted:
only names this module makes are read, never through a symlink, and every file is checked against
its own header before it is sent.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import asdict
from pathlib import Path

from storage.errors import MnistError
from storage.logs import BATCH_PATTERN, DATE_PATTERN, MAX_RECORDS_SIZE, LogBatch, LogEntry
from storage.s3 import VerificationFailed

SPOOLED = re.compile(r"^(\d{4}-\d{2}-\d{2})_(\d{6}-[0-9a-f]{12})\.batch$")
SCRATCH = re.compile(r"^\.(\d{4}-\d{2}-\d{2})_(\d{6}-[0-9a-f]{12})\.batch\.\d+-\d+\.tmp$")
MAX_HEADER = 64 << 20  # index entries of the largest batch a writer cuts, with room to spare
MAX_PAYLOAD = MAX_RECORDS_SIZE  # a batch's gzip never outgrows the records it holds (bar a few bytes)


class SpoolError(MnistError, ValueError):
    """A spooled file that does not read as the batch its name says (removed, and counted)."""


class Spool:
    """A directory of batches waiting for one store (``store_uri``), bounded in bytes: a folder of
    ``root`` of its own, so a gateway pointed at another bucket never sends, or drops, these."""

    def __init__(self, root: Path, store_uri: str, max_bytes: int):
        directory = root / hashlib.sha256(store_uri.encode()).hexdigest()[:16]
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory, self.store_uri, self.max_bytes = directory, store_uri, max_bytes
        self.lock = threading.Lock()
        for scratch in self.entries(SCRATCH):  # a write a crash cut short: never renamed, never acknowledged
            self.unlink(scratch)
        self.sizes = self.entries(SPOOLED)  # spooled batch -> its bytes
        self.reserved = 0  # bytes of batches being written

    # --- what is there -------------------------------------------------------------
    def entries(self, pattern: re.Pattern[str]) -> dict[str, int]:
        """Regular files (never symlinks) named as ``pattern`` says, with their sizes."""
        found = {}
        with os.scandir(self.directory) as listing:
            for entry in listing:
                if pattern.match(entry.name) and entry.is_file(follow_symlinks=False):
                    found[entry.name] = entry.stat(follow_symlinks=False).st_size
        return found

    def names(self) -> list[str]:
        """Spooled batches, oldest first (names start with the day and the time of the first call)."""
        with self.lock:
            return sorted(self.sizes)

    @property
    def depth(self) -> int:
        return len(self.sizes)

    @property
    def used_bytes(self) -> int:
        with self.lock:
            return sum(self.sizes.values())

    # --- writing and removing ----------------------------------------------------------
    def put(self, batch: LogBatch) -> bool:
        """Spool ``batch`` durably (fsynced file, atomic rename, fsynced directory); False, and
        nothing written, when it would take the spool past its bound."""
        header = json.dumps({"store": self.store_uri, "folder": batch.folder, "name": batch.name,
                             "records_size": batch.records_size, "size": len(batch.payload),
                             "sha256": batch.sha256, "entries": [asdict(entry) for entry in batch.entries]})
        name = f"{batch.folder}_{batch.name}.batch"
        if not SPOOLED.match(name):
            raise ValueError(f"{name!r} is not a spool name")
        size = len(header) + 1 + len(batch.payload)
        with self.lock:
            if sum(self.sizes.values()) + self.reserved + size > self.max_bytes:
                return False
            self.reserved += size  # a concurrent put cannot pass the bound too
        try:
            self.write(name, header.encode() + b"\n", batch.payload)
            with self.lock:
                self.sizes[name] = size  # listed once it is in place: the drain never reads a file being made
        finally:
            with self.lock:
                self.reserved -= size
        return True

    def write(self, name: str, header: bytes, payload: bytes) -> None:
        # the process and the thread: two writers of one batch (close and the writer) never share it
        scratch = self.directory / f".{name}.{os.getpid()}-{threading.get_native_id()}.tmp"
        descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as sink:
                sink.write(header)
                sink.write(payload)
                sink.flush()
                os.fsync(sink.fileno())
            os.replace(scratch, self.directory / name)
        except BaseException:
            self.unlink(scratch.name)
            raise
        self.sync_directory()

    def sync_directory(self) -> None:
        """The rename itself made durable: without it a crash can forget a file already acknowledged."""
        descriptor = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def remove(self, name: str) -> None:
        with self.lock:
            self.sizes.pop(name, None)
        self.unlink(name)

    def unlink(self, name: str) -> None:
        try:
            (self.directory / name).unlink()
        except FileNotFoundError:  # another gateway on the same spool took it first
            pass

    # --- reading back ------------------------------------------------------------------
    def read(self, name: str) -> LogBatch:
        """The batch in spool file ``name``, checked against its name, its header and this store;
        SpoolError when it does not read (FileNotFoundError when it is gone)."""
        matched = SPOOLED.match(name)
        if not matched:
            raise SpoolError(f"{name[:80]!r} is not a spool name")
        descriptor = os.open(self.directory / name, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(descriptor, "rb") as source:
            if os.fstat(source.fileno()).st_size > MAX_HEADER + MAX_PAYLOAD + 1:  # never read into memory
                raise SpoolError(f"{name}: {os.fstat(source.fileno()).st_size} bytes, more than any batch")
            line = source.readline(MAX_HEADER)
            try:
                header = json.loads(line)
            except ValueError:
                raise SpoolError(f"{name}: its header does not read") from None
            if not isinstance(header, dict) or not isinstance(header.get("entries"), list):
                raise SpoolError(f"{name}: its header is not a batch's")
            size = header.get("size")
            if type(size) is not int or not 0 < size <= MAX_PAYLOAD:
                raise SpoolError(f"{name}: its header gives no payload size a batch has")
            payload = source.read(size + 1)
        folder, batch_name = matched.groups()
        if header.get("store") != self.store_uri:
            raise SpoolError(f"{name}: spooled for {str(header.get('store'))[:200]}, not {self.store_uri}")
        if (header.get("folder"), header.get("name")) != (folder, batch_name) or not (
                DATE_PATTERN.match(folder) and BATCH_PATTERN.match(batch_name)):
            raise SpoolError(f"{name}: its header names another batch")
        if header.get("size") != len(payload) or header.get("sha256") != hashlib.sha256(payload).hexdigest():
            raise SpoolError(f"{name}: the payload does not match its header (size {len(payload)})")
        records_size = header.get("records_size")
        if type(records_size) is not int or records_size <= 0 or not header["entries"]:
            raise SpoolError(f"{name}: its header is not a batch's")
        try:
            entries = tuple(LogEntry.checked(raw) for raw in header["entries"])
        except VerificationFailed as error:
            raise SpoolError(f"{name}: {error}") from None
        return LogBatch(folder, batch_name, payload, records_size, entries)
