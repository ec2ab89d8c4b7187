"""A dataset version as streams: the store's batches cached locally by content, as record files
that ``tf.data`` reads, and a small plan file naming them.

A training run on MNIST plus a dataset version no longer copies every example (new ones
``new_data_weight`` times) into one array. Each batch is fetched once, verified against its
manifest, and split into three files of fixed-length records (label byte, then the 784 pixel
bytes): ``<sha256>.train.rec``, ``.validation.rec`` and ``.test.rec``. An index file
``<sha256>.json`` is written last, so a batch is in the cache only once all three files are
whole; a killed download leaves only ``.partial`` files, which nothing reads, and two runs
filling the cache at once each rename whole files into place. The cache is keyed by the batch's
content digest, so a second run of the same version reads nothing from the store.

The plan (``mnist-<fingerprint>.plan.json`` beside MNIST's prepared ``.npz``) names MNIST's
prepared splits, the weight and every cached batch; training samples new examples from it with
``tf.data`` (``sample_from_datasets``), and evaluation reads the test slices in chunks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from storage.errors import MnistError

RECORD_BYTES = 1 + 28 * 28  # label, then pixels: one example
SPLITS = ("train", "validation", "test")
PLAN_SUFFIX = ".plan.json"
CHUNK = 4096  # examples per read when a slice is evaluated: about 3 MB uint8, 13 MB as model input


class CacheError(MnistError, RuntimeError):
    """A cached batch does not match its index (a file was changed or cut after it was written)."""


def records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """Examples as fixed-length records: each one's label byte, then its pixels."""
    rows = np.empty((len(labels), RECORD_BYTES), np.uint8)
    rows[:, 0] = labels
    rows[:, 1:] = images.reshape(len(labels), 28 * 28)
    return rows.tobytes()


def write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with partial.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)


class ShardCache:
    """The store's batches on local disk as record files, keyed by content digest."""

    def __init__(self, root: Path):
        self.root = root

    def files(self, digest: str) -> dict[str, Path]:
        return {split: self.root / f"{digest}.{split}.rec" for split in SPLITS}

    def cached(self, digest: str) -> dict[str, Any] | None:
        """The batch's index when the cache holds it whole, else None."""
        index_path = self.root / f"{digest}.json"
        if not index_path.is_file():
            return None
        index = json.loads(index_path.read_text())
        for split, path in self.files(digest).items():
            size = path.stat().st_size if path.is_file() else -1
            if size != index["counts"][split] * RECORD_BYTES:
                raise CacheError(f"cached batch {digest[:12]}: {path.name} holds {size} bytes, its index says "
                                 f"{index['counts'][split]} examples; remove {self.root} to fetch it again")
        return index

    def add(self, digest: str, source: str, images: np.ndarray, labels: np.ndarray, splits: np.ndarray
            ) -> dict[str, Any]:
        """Write one batch's record files, then its index (last: the batch is cached from then on)."""
        self.root.mkdir(parents=True, exist_ok=True)
        counts = {}
        for number, (split, path) in enumerate(self.files(digest).items()):
            chosen = splits == number
            write_atomically(path, records(images[chosen], labels[chosen]))
            counts[split] = int(chosen.sum())
        index = {"sha256": digest, "source": source, "counts": counts}
        write_atomically(self.root / f"{digest}.json", json.dumps(index).encode())
        return index

    def ensure(self, store: Any, digests: list[str]) -> tuple[list[dict[str, Any]], int]:
        """Each batch's index, in order; the batches the cache lacks are fetched from ``store``
        (verified), from a pack when one holds them, else one by one. Also returns how many
        objects were read from the store for it."""
        indexes = {digest: index for digest in digests if (index := self.cached(digest)) is not None}
        missing = set(digests) - indexes.keys()
        reads = 0
        if missing:
            packs = {pack: manifest for batch, (pack, manifest) in store.pack_index().items() if batch in missing}
            for pack, manifest in packs.items():
                sources = {entry["sha256"]: entry["source"] for entry in manifest["batches"]}
                for digest, examples in store.read_pack(pack, manifest):
                    if digest in missing:
                        indexes[digest] = self.add(digest, sources[digest], examples.images, examples.labels,
                                                   examples.splits)
                        missing.discard(digest)
                reads += 1
            for digest in sorted(missing):
                manifest = store.batch_manifest(digest)
                examples = store.read_batch(digest, manifest)
                indexes[digest] = self.add(digest, manifest["source"], examples.images, examples.labels,
                                           examples.splits)
                reads += 1
        return [indexes[digest] for digest in digests], reads


# --- the plan: MNIST's prepared splits plus a dataset version's cached batches ---------------
@dataclass(frozen=True)
class DataPlan:
    base: Path  # MNIST's prepared .npz (uint8 train, validation and test splits)
    weight: int  # how many times, in expectation, each new training example is seen per epoch
    version: int
    shards: list[dict[str, Any]]  # per batch: sha256, source, counts per split, files per split

    def count(self, split: str) -> int:
        return sum(shard["counts"][split] for shard in self.shards)

    def files(self, split: str) -> list[str]:
        return [shard["files"][split] for shard in self.shards if shard["counts"][split]]

    @property
    def sources(self) -> list[str]:
        return sorted({shard["source"] for shard in self.shards})


def is_plan(path: Path) -> bool:
    return path.name.endswith(PLAN_SUFFIX)


def write_plan(destination: Path, base: Path, version: int, weight: int, cache: ShardCache,
               indexes: list[dict[str, Any]]) -> Path:
    shards = [{**index, "files": {split: str(path) for split, path in cache.files(index["sha256"]).items()}}
              for index in indexes]
    write_atomically(destination, json.dumps({"base": str(base), "weight": weight, "version": version,
                                              "shards": shards}, indent=1).encode())
    return destination


def read_plan(path: Path) -> DataPlan:
    raw = json.loads(path.read_text())
    return DataPlan(Path(raw["base"]), int(raw["weight"]), int(raw["version"]), raw["shards"])


def read_records(path: str, chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uint8 images [n,28,28], labels [n]) of a record file, ``chunk`` examples at a time, by plain
    reads: a memory map would count the whole file in the process's resident memory."""
    with open(path, "rb") as handle:
        while block := handle.read(chunk * RECORD_BYTES):
            rows = np.frombuffer(block, np.uint8).reshape(-1, RECORD_BYTES)
            yield rows[:, 1:].reshape(-1, 28, 28), rows[:, 0].astype(np.int64)


def slice_chunks(plan: DataPlan, chunk: int = CHUNK) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Every new source's test examples as (source, uint8 images, labels), a chunk at a time."""
    for shard in plan.shards:
        if shard["counts"]["test"]:
            for images, labels in read_records(shard["files"]["test"], chunk):
                yield shard["source"], images, labels


# --- tf.data: what training reads ------------------------------------------------------------
def new_example_share(base_count: int, new_count: int, weight: int) -> float:
    """The share of new examples in the training stream: as if each were repeated ``weight`` times."""
    return weight * new_count / (base_count + weight * new_count) if new_count else 0.0


MAX_NEW_VALIDATION = 20_000  # new validation examples an epoch validates on: a bounded sample


def base_records(plan: DataPlan, split: str) -> tuple[str, int]:
    """MNIST's prepared ``train`` or ``val`` split as a record file beside its .npz (written once,
    atomically), so MNIST and the new examples flow through tf.data alike; and its length."""
    path = plan.base.with_name(f"{plan.base.stem}.{split}.rec")
    if not path.is_file():
        with np.load(plan.base) as arrays:
            write_atomically(path, records(arrays[f"x_{split}"], arrays[f"y_{split}"]))
    return str(path), path.stat().st_size // RECORD_BYTES


def decode_batch(batch):
    """A batch of records as the model takes it: float images [B,28,28,1] in [0,1], int labels [B].
    Decoded a batch at a time: per example, tf.data only moves the record's bytes."""
    import tensorflow as tf

    raw = tf.io.decode_raw(batch, tf.uint8)
    return tf.cast(tf.reshape(raw[:, 1:], (-1, 28, 28, 1)), tf.float32) / 255.0, tf.cast(raw[:, 0], tf.int32)


def record_stream(files: list[str], seed: int, shuffle_buffer: int):
    """The records of ``files``: files in a fresh order each pass, read four at a time, through a
    shuffle buffer; repeated without end."""
    import tensorflow as tf

    return (tf.data.Dataset.from_tensor_slices(files)
            .shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
            .interleave(lambda name: tf.data.FixedLengthRecordDataset(name, RECORD_BYTES),
                        cycle_length=min(4, len(files)), num_parallel_calls=tf.data.AUTOTUNE)
            .shuffle(shuffle_buffer, seed=seed + 1, reshuffle_each_iteration=True)
            .repeat())


def training_stream(plan: DataPlan, seed: int, shuffle_buffer: int = 16384):
    """Endless training records: MNIST's (held in memory, 43 MB) and the new ones (streamed from
    the cache), sampled at the new examples' weighted share: the weight costs no copy."""
    import tensorflow as tf

    base_file, base_count = base_records(plan, "train")
    base = (tf.data.FixedLengthRecordDataset(base_file, RECORD_BYTES).cache()
            .shuffle(base_count, seed=seed, reshuffle_each_iteration=True).repeat())
    files = plan.files("train")
    if not files:
        return base
    share = new_example_share(base_count, plan.count("train"), plan.weight)
    return tf.data.Dataset.sample_from_datasets([base, record_stream(files, seed, shuffle_buffer)],
                                                weights=[1.0 - share, share], seed=seed + 2)


def validation_stream(plan: DataPlan, limit: int = MAX_NEW_VALIDATION):
    """MNIST's validation records, then at most ``limit`` new ones, taken from up to 64 batches at
    once so that every source early in the version is in the sample: validation (early stopping,
    the choice between candidates) costs the same at 3 million new examples as at 30,000. The gate
    reads every test slice whole."""
    import tensorflow as tf

    base_file, base_count = base_records(plan, "val")
    stream = tf.data.FixedLengthRecordDataset(base_file, RECORD_BYTES)
    files = plan.files("validation")
    new_count = min(limit, plan.count("validation"))
    if files:
        stream = stream.concatenate(
            tf.data.Dataset.from_tensor_slices(files)
            .interleave(lambda name: tf.data.FixedLengthRecordDataset(name, RECORD_BYTES),
                        cycle_length=min(64, len(files)), block_length=16)
            .take(new_count))
    # a known length: Keras warns (and the suite's warnings are errors) when a stream of unknown
    # length ends, as a finite validation stream must
    return stream.apply(tf.data.experimental.assert_cardinality(base_count + new_count))
