"""The dataset registry on S3: immutable batches of labelled digits and numbered versions.

Layout (``docs/feedback-loop.md``, "Growing data"), beside the model store in the same bucket::

    <prefix>/datasets/<name>/batches/<sha256>/examples.bin     images uint8 [N,28,28], then labels, then splits
    <prefix>/datasets/<name>/batches/<sha256>/manifest.json    written last: count, histogram, source, report
    <prefix>/datasets/<name>/versions/<n>.json                 the batches of version n (written last,
                                                               only if absent: the compare-and-swap)
    <prefix>/datasets/<name>/packs/<sha256>/pack.bin.z         small batches compacted: their payloads, in order,
                                                               zlib-compressed (the name: SHA-256 uncompressed)
    <prefix>/datasets/<name>/packs/<sha256>/manifest.json      written last: each batch's offset, size and digest
    <prefix>/datasets/<name>/_registry/claims/<n>              numbers claimed by earlier releases
    <prefix>/datasets/<name>/_registry/history/...             one object per event

A batch is content-addressed: its name is the SHA-256 of its payload, so the same
examples always make the same batch, and a batch never changes. It is visible only
once its manifest exists; a version only once its file exists, and it lists only
complete batches. The MNIST base is part of every version by its IDX digests, so
offline runs still read it from ``MNIST_DATA_DIR``.

A pack holds many small batches (a year of daily feedback is thousands of them) so that a
machine with an empty cache reads a version in a few large, compressed objects, not one request
per batch. Packs change nothing a version says: a version still names its batches, and every
batch read from a pack is checked against its own content digest. A pack is visible only once
its manifest exists, so a compaction killed at any point leaves nothing partial visible.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from storage.s3 import LocalFile, ObjectStore, StoreError, VerificationFailed, utc_now
from storage.settings import DatasetSettings

PAYLOAD = "examples.bin"
PACK = "pack.bin.z"
PACK_EXAMPLES = 50_000  # a pack's size: 39 MB of examples, about 8 MB compressed
EXAMPLE_BYTES = 28 * 28 + 2  # pixels, label, split
MAX_PACK_BYTES = 8 * PACK_EXAMPLES * EXAMPLE_BYTES  # what a pack may inflate to: bigger is not ours
MANIFEST = "manifest.json"
QUARANTINE = "quarantine"
SPLITS = ("train", "validation", "test")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
SOURCE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class DatasetNotFound(StoreError):
    """No such dataset version or batch."""

    status = "NOT_FOUND"


@dataclass(frozen=True)
class Examples:
    """Labelled digits: images uint8 [N,28,28], labels uint8 [N], split uint8 [N] (index into SPLITS)."""

    images: np.ndarray
    labels: np.ndarray
    splits: np.ndarray

    def payload(self) -> bytes:
        return self.images.astype(np.uint8).tobytes() + self.labels.astype(np.uint8).tobytes() + \
            self.splits.astype(np.uint8).tobytes()

    @classmethod
    def from_payload(cls, raw: bytes, count: int) -> "Examples":
        if len(raw) != count * (784 + 2):
            raise VerificationFailed(f"payload of {len(raw)} bytes cannot hold {count} examples")
        data = np.frombuffer(raw, dtype=np.uint8)
        images = data[:count * 784].reshape(count, 28, 28)
        return cls(images, data[count * 784:count * 785], data[count * 785:])


def version_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


def example_hashes(images: np.ndarray) -> list[str]:
    """One SHA-256 per prepared digit (uint8 pixels): duplicate detection and the split."""
    return [hashlib.sha256(image.tobytes()).hexdigest() for image in images.astype(np.uint8)]


def split_of(example_hash: str) -> int:
    """80/10/10 by the example's own hash: an example's split never changes as data grows."""
    bucket = int(example_hash[:8], 16) % 10
    return 0 if bucket < 8 else 1 if bucket == 8 else 2


class DatasetStore(ObjectStore):
    """One dataset's batches, versions and history in the bucket the models live in."""

    def __init__(self, settings: DatasetSettings, client: Any = None):
        root = "/".join(p for p in (settings.s3_prefix.strip("/"), "datasets", settings.dataset_name) if p)
        super().__init__(settings, root, client)

    # --- batches ----------------------------------------------------------------
    def batch_manifest(self, digest: str) -> dict[str, Any]:
        if not SHA256_PATTERN.match(digest):
            raise DatasetNotFound(f"not a batch name: {digest!r}")
        manifest = self.get_json(self.key("batches", digest, MANIFEST))
        if manifest is None:
            raise DatasetNotFound(f"batch {digest[:12]} of {self.uri()} does not exist")
        return manifest

    def complete_batches(self) -> list[str]:
        return self.complete_items("batches")

    def complete_items(self, folder: str) -> list[str]:
        """The digests under ``folder`` (batches or packs) whose manifest exists: the complete ones."""
        prefix = self.key(folder, "")
        names = (item["Key"][len(prefix):].split("/") for item in self.list_keys(prefix))
        return sorted(parts[0] for parts in names if parts[-1] == MANIFEST and SHA256_PATTERN.match(parts[0]))

    def put_batch(self, examples: Examples, metadata: dict[str, Any], folder: str = "batches") -> dict[str, Any]:
        """Upload the payload (server-checked, read back), then the manifest: the batch exists
        from that last write on. The same examples give the same batch, written once.
        ``folder``: ``quarantine`` for examples the screen holds back (no version lists those)."""
        payload = examples.payload()
        digest = hashlib.sha256(payload).hexdigest()
        self.ensure_bucket()
        existing = self.get_json(self.key(folder, digest, MANIFEST))
        if existing is not None:
            return existing
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / PAYLOAD
            path.write_bytes(payload)
            payload_file = LocalFile(PAYLOAD, path, digest, len(payload))
            entries = self.upload_verified(self.key(folder, digest), [payload_file])
        manifest = {**metadata, "sha256": digest, "count": int(len(examples.labels)), "files": entries,
                    "label_histogram": np.bincount(examples.labels, minlength=10).tolist(),
                    "split_counts": {name: int((examples.splits == i).sum()) for i, name in enumerate(SPLITS)},
                    "ingested_at": utc_now()}
        self.write_manifest(self.key(folder, digest, MANIFEST), manifest)
        return manifest

    def read_batch(self, digest: str, manifest: dict[str, Any] | None = None, folder: str = "batches") -> Examples:
        """A batch's examples, verified against its manifest (read here unless given)."""
        manifest = manifest or self.batch_manifest(digest)
        raw = self.fetch_verified(self.key(folder, digest, PAYLOAD), manifest["files"][PAYLOAD],
                                  f"batch {digest[:12]}: {PAYLOAD}")
        return Examples.from_payload(raw, manifest["count"])

    # --- quarantine: examples the screen holds back, until an operator decides --------------
    def quarantined(self) -> list[str]:
        """Every held batch's digest (complete ones: their manifest exists)."""
        return self.complete_items(QUARANTINE)

    def quarantine_manifest(self, digest: str) -> dict[str, Any]:
        if not SHA256_PATTERN.match(digest):
            raise DatasetNotFound(f"not a quarantine id: {digest[:70]!r}")
        manifest = self.get_json(self.key(QUARANTINE, digest, MANIFEST))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("count"), int) \
                or not isinstance(manifest.get("reasons"), list) or len(manifest["reasons"]) != manifest["count"]:
            raise DatasetNotFound(f"no held batch {digest[:12]} in {self.uri()}")
        return manifest

    def decisions(self, digest: str) -> dict[int, dict[str, Any]]:
        """Example index -> the operator's decision on it (accept or reject), first decision wins."""
        decided: dict[int, dict[str, Any]] = {}
        prefix = self.key(QUARANTINE, digest, "decisions", "")
        for item in sorted(self.list_keys(prefix), key=lambda entry: entry["Key"]):
            record = self.get_json(item["Key"])
            if not isinstance(record, dict) or record.get("action") not in ("accept", "reject"):
                continue
            for index in record.get("examples", []):
                if type(index) is int:
                    decided.setdefault(index, record)
        return decided

    def decide_quarantined(self, digest: str, action: str, examples: list[int], details: dict[str, Any]) -> None:
        """Record an operator's decision on some examples of a held batch (a new object each time,
        named by time: nothing is overwritten)."""
        record = {"action": action, "examples": sorted(examples), "time": utc_now(), **details}
        name = f"{utc_now().replace(':', '')}-{hashlib.sha256(json.dumps(record).encode()).hexdigest()[:12]}.json"
        self.put_new(self.key(QUARANTINE, digest, "decisions", name), json.dumps(record, sort_keys=True).encode())

    # --- versions ---------------------------------------------------------------
    def versions(self) -> list[int]:
        prefix = self.key("versions", "")
        names = (item["Key"][len(prefix):] for item in self.list_keys(prefix))
        return sorted(int(name[:-5]) for name in names if name.endswith(".json") and name[:-5].isdigit())

    def version(self, number: int) -> dict[str, Any]:
        manifest = self.get_json(self.key("versions", f"{number}.json"))
        if manifest is None:
            raise DatasetNotFound(f"dataset version {number} of {self.uri()} does not exist")
        return manifest

    def latest(self) -> dict[str, Any] | None:
        versions = self.versions()
        return self.version(versions[-1]) if versions else None

    def add_batch(self, digest: str, details: dict[str, Any], checked_against: list[str],
                  check_rebase: Callable[[list[str]], None]) -> dict[str, Any]:
        """The latest version plus batch ``digest``, as the next version: compare-and-swap on the
        version sequence. Version ``n`` is created only if absent, so of two writers that read the
        same latest, one writes ``n`` and the other finds it taken, rebases on it and tries
        ``n + 1``: every batch of every writer is in the final version, and no version is partial
        or overwritten. ``check_rebase`` sees each batch beyond ``checked_against`` (the batches
        the caller already checked ``digest`` against) before it is built on, and may refuse."""
        manifests = {digest: self.batch_manifest(digest)}
        known = set(checked_against)
        while True:
            latest = self.latest()
            base = list(latest["batches"]) if latest else []
            unseen = [batch for batch in base if batch not in known and batch != digest]
            if unseen:
                check_rebase(unseen)
            known.update(base)
            batches = sorted(set(base) | {digest})
            for batch in batches:
                if batch not in manifests:
                    manifests[batch] = self.batch_manifest(batch)
            number = self.next_number(latest)
            manifest = self.version_manifest(number, batches, manifests, {
                **details, "parent": latest["version"] if latest else None, "added_batch": digest})
            if self.put_new(self.key("versions", f"{number}.json"), version_bytes(manifest)):
                return self.recorded(manifest)

    def next_number(self, latest: dict[str, Any] | None) -> int:
        """One past ``latest`` (the version built on, read once: a second listing could see a
        version it does not build on) and past every number claimed before versions were
        compare-and-swapped (``_registry/claims``, never deleted): no number is used twice."""
        return max([latest["version"] if latest else 0, *self.claimed_numbers()]) + 1

    def version_manifest(self, number: int, batches: list[str], manifests: dict[str, dict[str, Any]],
                         details: dict[str, Any]) -> dict[str, Any]:
        sources: dict[str, dict[str, int]] = {}
        for digest in batches:
            counts = sources.setdefault(manifests[digest]["source"], {name: 0 for name in SPLITS})
            for name in SPLITS:
                counts[name] += manifests[digest]["split_counts"][name]
        return {**details, "version": number, "batches": sorted(batches), "sources": sources,
                "examples": sum(manifests[digest]["count"] for digest in batches), "created_at": utc_now(),
                "fingerprint": hashlib.sha256(json.dumps(sorted(batches)).encode()).hexdigest()}

    def recorded(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.record({"event": "dataset-version", "version": manifest["version"], "batches": len(manifest["batches"]),
                     "examples": manifest["examples"]})
        return manifest

    def examples(self, version: dict[str, Any]) -> Iterator[tuple[str, Examples]]:
        """(source, examples) of every batch of a version, one batch in memory at a time."""
        for digest in version["batches"]:
            manifest = self.batch_manifest(digest)
            yield manifest["source"], self.read_batch(digest, manifest)

    def known_hashes(self, version: dict[str, Any] | None) -> set[str]:
        """The example hashes of every batch of ``version``: ingest refuses exact duplicates."""
        known: set[str] = set()
        for _, examples in self.examples(version) if version else []:
            known.update(example_hashes(examples.images))
        return known

    # --- packs: small batches compacted ---------------------------------------------
    def packs(self) -> dict[str, dict[str, Any]]:
        """Every complete pack's manifest, by the pack's digest."""
        return {digest: self.get_json(self.key("packs", digest, MANIFEST)) for digest in self.complete_items("packs")}

    def pack_index(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Batch digest -> (pack digest, pack manifest), for every batch a complete pack holds."""
        return {entry["sha256"]: (digest, manifest) for digest, manifest in self.packs().items()
                for entry in manifest["batches"]}

    def compact(self, version: dict[str, Any], target: int = PACK_EXAMPLES,
                full_only: bool = False) -> list[dict[str, Any]]:
        """Pack the version's batches that are smaller than ``target`` examples and in no pack yet,
        in the version's order, into packs of up to ``target`` examples; a group of one stays as
        it is, and with ``full_only`` (at ingest) so does the last, unfilled group. The same
        batches always make the same pack, so two compactions at once write the same objects.
        Returns the new packs' manifests."""
        if not 2 <= target <= MAX_PACK_BYTES // EXAMPLE_BYTES:
            raise ValueError(f"pack size {target}: must be 2-{MAX_PACK_BYTES // EXAMPLE_BYTES} examples")
        packed = self.pack_index()
        loose = [(digest, manifest) for digest in version["batches"] if digest not in packed
                 for manifest in [self.batch_manifest(digest)] if manifest["count"] < target]
        groups: list[list[tuple[str, dict[str, Any]]]] = [[]]
        for digest, manifest in loose:
            if groups[-1] and sum(m["count"] for _, m in groups[-1]) + manifest["count"] > target:
                groups.append([])
            groups[-1].append((digest, manifest))
        return [self.write_pack(group) for group in (groups[:-1] if full_only else groups) if len(group) > 1]

    def write_pack(self, group: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        """One pack: the payload (compressed, server-checked, read back), then its manifest."""
        entries, parts, offset = [], [], 0
        for digest, manifest in group:
            raw = self.fetch_verified(self.key("batches", digest, PAYLOAD), manifest["files"][PAYLOAD],
                                      f"batch {digest[:12]}: {PAYLOAD}")
            entries.append({"sha256": digest, "count": manifest["count"], "offset": offset, "bytes": len(raw),
                            "source": manifest["source"], "split_counts": manifest["split_counts"]})
            parts.append(raw)
            offset += len(raw)
        payload = b"".join(parts)
        digest = hashlib.sha256(payload).hexdigest()
        existing = self.get_json(self.key("packs", digest, MANIFEST))
        if existing is not None:
            return existing
        compressed = zlib.compress(payload, 6)
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / PACK
            path.write_bytes(compressed)
            files = self.upload_verified(self.key("packs", digest), [
                LocalFile(PACK, path, hashlib.sha256(compressed).hexdigest(), len(compressed))])
        manifest = {"sha256": digest, "bytes": len(payload), "count": sum(e["count"] for e in entries),
                    "batches": entries, "files": files, "packed_at": utc_now()}
        self.write_manifest(self.key("packs", digest, MANIFEST), manifest)
        return manifest

    def read_pack(self, digest: str, manifest: dict[str, Any]) -> Iterator[tuple[str, Examples]]:
        """(batch digest, examples) of every batch in a pack, each checked against its own digest.
        The decompressed size is bounded by the manifest before anything is inflated."""
        if not SHA256_PATTERN.match(digest) or not 0 < manifest["bytes"] <= MAX_PACK_BYTES:
            raise VerificationFailed(f"pack {digest[:12]}: not a pack this store writes")
        compressed = self.fetch_verified(self.key("packs", digest, PACK), manifest["files"][PACK],
                                         f"pack {digest[:12]}: {PACK}")
        inflater = zlib.decompressobj()
        payload = inflater.decompress(compressed, manifest["bytes"] + 1)
        if len(payload) != manifest["bytes"] or hashlib.sha256(payload).hexdigest() != digest:
            raise VerificationFailed(f"pack {digest[:12]}: its payload does not match its name")
        for entry in manifest["batches"]:
            piece = payload[entry["offset"]:entry["offset"] + entry["bytes"]]
            if hashlib.sha256(piece).hexdigest() != entry["sha256"]:
                raise VerificationFailed(f"pack {digest[:12]}: batch {entry['sha256'][:12]} does not match its digest")
            yield entry["sha256"], Examples.from_payload(piece, entry["count"])
