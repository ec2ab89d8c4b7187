"""Data stage: read MNIST IDX files, verify them, split, fingerprint, cache.

Pure functions only; the Prefect task lives in ``tasks/stages.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from storage.errors import MnistError
from storage.settings import S3Settings

# SHA-256 of the uncompressed canonical files. Checking the uncompressed bytes
# lets a user bring either the .gz files or the raw ones.
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)

class DataError(MnistError, ValueError):
    """The MNIST files are missing, corrupt or inconsistent."""

    status = "INVALID_ARGUMENT"


@dataclass(frozen=True)
class RawSplit:
    images: np.ndarray  # uint8 [N, 28, 28]
    labels: np.ndarray  # uint8 [N]


@dataclass(frozen=True)
class PreparedData:
    """Arrays ready for Keras: images float32 [N,28,28,1] in [0,1], labels int."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def find_idx_file(data_dir: Path, name: str) -> Path:
    """Return ``name`` or ``name.gz`` inside ``data_dir``."""
    for candidate in (data_dir / f"{name}.gz", data_dir / name):
        if candidate.is_file():
            return candidate
    raise DataError(f"{data_dir}: missing {name} (or {name}.gz)")


def read_file_bytes(path: Path) -> bytes:
    """Return the uncompressed bytes of a raw or gzip file."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"{path}: cannot read ({error})") from error


def parse_idx(raw: bytes, expected_magic: int, source: Path) -> np.ndarray:
    """Parse IDX bytes (big-endian header, then uint8 data) into an array."""
    if len(raw) < 8:
        raise DataError(f"{source}: truncated header ({len(raw)} bytes)")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise DataError(f"{source}: wrong magic number 0x{magic:08x}, expected 0x{expected_magic:08x}")
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{source}: truncated header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected_size = header_size + int(np.prod(dims))
    if len(raw) != expected_size:
        problem = "truncated" if len(raw) < expected_size else "trailing bytes"
        raise DataError(f"{source}: {problem}: {len(raw)} bytes, header {dims} needs {expected_size}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)


def read_verified_idx(data_dir: Path, name: str, expected_magic: int,
                      expected_digests: dict[str, str]) -> tuple[np.ndarray, str]:
    """Read one IDX file, check its structure and its SHA-256; return (array, digest)."""
    path = find_idx_file(data_dir, name)
    raw = read_file_bytes(path)
    array = parse_idx(raw, expected_magic, path)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected_digests[name]:
        raise DataError(f"{path}: SHA-256 mismatch: got {digest}, expected {expected_digests[name]}")
    return array, digest


def read_split(data_dir: Path, prefix: str, expected_digests: dict[str, str]) -> tuple[RawSplit, dict[str, str]]:
    images, images_digest = read_verified_idx(data_dir, f"{prefix}-images-idx3-ubyte", IMAGES_MAGIC,
                                              expected_digests)
    labels, labels_digest = read_verified_idx(data_dir, f"{prefix}-labels-idx1-ubyte", LABELS_MAGIC,
                                              expected_digests)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{data_dir}: {prefix} has {images.shape[0]} images but {labels.shape[0]} labels"
        )
    if labels.max(initial=0) >= NUM_CLASSES:
        raise DataError(f"{data_dir}: {prefix} labels outside 0-9")
    digests = {f"{prefix}-images-idx3-ubyte": images_digest, f"{prefix}-labels-idx1-ubyte": labels_digest}
    return RawSplit(images, labels), digests


def load_mnist_idx(data_dir: Path, expected_digests: dict[str, str] = MNIST_SHA256
                   ) -> tuple[RawSplit, RawSplit, dict[str, str]]:
    """Read and verify the four MNIST files; return train, test and their digests."""
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a directory (set --data-dir or MNIST_DATA_DIR)")
    train, train_digests = read_split(data_dir, "train", expected_digests)
    test, test_digests = read_split(data_dir, "t10k", expected_digests)
    return train, test, {**train_digests, **test_digests}


def load_mnist_keras() -> tuple[RawSplit, RawSplit, dict[str, str]]:
    """Fallback for users with internet: Keras downloads and caches MNIST."""
    import keras  # imported here: only this path needs it

    (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    digests = {
        name: hashlib.sha256(array.tobytes()).hexdigest()
        for name, array in {"train-images": x_train, "train-labels": y_train,
                            "t10k-images": x_test, "t10k-labels": y_test}.items()
    }
    return RawSplit(x_train, y_train), RawSplit(x_test, y_test), digests


def load_mnist(data_dir: Path | None) -> tuple[RawSplit, RawSplit, dict[str, str]]:
    """The verified IDX files in ``data_dir``; without one, Keras's download (needs internet)."""
    return load_mnist_idx(data_dir) if data_dir else load_mnist_keras()


def data_fingerprint(digests: dict[str, str], validation_size: int, split_seed: int,
                     train_limit: int | None) -> str:
    """One digest naming exactly which data and which split a model saw."""
    payload = json.dumps(
        {"files": digests, "validation_size": validation_size, "split_seed": split_seed,
         "train_limit": train_limit},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def split_train_validation(train: RawSplit, validation_size: int, seed: int,
                           train_limit: int | None = None) -> tuple[RawSplit, RawSplit]:
    """Seeded split of the training set; the test set never takes part."""
    if not 0 <= validation_size < train.labels.shape[0]:
        raise DataError(f"validation_size {validation_size} must be in [0, {train.labels.shape[0]})")
    order = np.random.default_rng(seed).permutation(train.labels.shape[0])
    val_idx, train_idx = order[:validation_size], order[validation_size:]
    if train_limit is not None:
        train_idx = train_idx[:train_limit]
    return (RawSplit(train.images[train_idx], train.labels[train_idx]),
            RawSplit(train.images[val_idx], train.labels[val_idx]))


def save_prepared(path: Path, train: RawSplit, val: RawSplit, test: RawSplit) -> None:
    """Write uint8 arrays (4x smaller than float32) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with partial.open("wb") as handle:
        np.savez(handle, x_train=train.images, y_train=train.labels, x_val=val.images,
                 y_val=val.labels, x_test=test.images, y_test=test.labels)
    partial.replace(path)


def prepare_dataset(data_dir: Path | None, cache_dir: Path, validation_size: int,
                    split_seed: int, train_limit: int | None = None) -> tuple[Path, str]:
    """Verify the raw data, split it, and cache the result keyed on its inputs.

    Returns the prepared ``.npz`` path and the data fingerprint.
    """
    train, test, digests = load_mnist(data_dir)
    fingerprint = data_fingerprint(digests, validation_size, split_seed, train_limit)
    cached = cache_dir / f"mnist-{fingerprint[:16]}.npz"
    if not cached.exists():
        train_part, val_part = split_train_validation(train, validation_size, split_seed, train_limit)
        save_prepared(cached, train_part, val_part, test)
    return cached, fingerprint


NO_MNIST = ("needs the MNIST files: set MNIST_DATA_DIR to the folder of the four IDX files "
            "(make and mnist find ../shared/datasets/mnist beside the checkout by themselves)")


def mnist_test_digits(data_dir: Path | None, start: int, stop: int) -> tuple[list[str], np.ndarray, list[int]]:
    """MNIST test digits [start, stop) as model input, with their names and true labels."""
    if data_dir is None:
        raise DataError(f"the MNIST test digits {NO_MNIST}")
    test, _ = read_split(data_dir, "t10k", MNIST_SHA256)
    labels = [int(label) for label in test.labels[start:stop]]
    return [f"mnist-test[{i}]" for i in range(start, stop)], to_model_input(test.images[start:stop]), labels


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N,28,28] -> float32 [N,28,28,1] in [0,1], the model's input."""
    # One pass and one array (not a float copy, then its quotient): the same values, a third of a second sooner
    return np.divide(images, np.float32(255), dtype=np.float32)[..., np.newaxis]


def load_prepared(path: Path) -> PreparedData:
    with np.load(path) as arrays:
        return PreparedData(
            x_train=to_model_input(arrays["x_train"]), y_train=arrays["y_train"].astype(np.int64),
            x_val=to_model_input(arrays["x_val"]), y_val=arrays["y_val"].astype(np.int64),
            x_test=to_model_input(arrays["x_test"]), y_test=arrays["y_test"].astype(np.int64),
        )


def load_test_set(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Only MNIST's test split: evaluation and plots need nothing else."""
    with np.load(base_arrays(path)) as arrays:
        return to_model_input(arrays["x_test"]), arrays["y_test"].astype(np.int64)


def base_arrays(path: Path) -> Path:
    """MNIST's prepared .npz: ``path`` itself, or the one a dataset version's plan builds on."""
    from tasks.shards import is_plan, read_plan

    return read_plan(path).base if is_plan(path) else path


def slice_batches(path: Path) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """The test slice of every new source as (source, model input, labels), a chunk at a time;
    nothing for MNIST alone. Never the whole slice in memory."""
    from tasks.shards import is_plan, read_plan, slice_chunks

    if not is_plan(path):
        return
    for source, images, labels in slice_chunks(read_plan(path)):
        yield source, to_model_input(images), labels


# --- MNIST plus a dataset version -----------------------------------------------------------
def combined_fingerprint(base: str, dataset: dict | None, weight: int) -> str:
    if dataset is None:
        return base
    payload = {"base": base, "dataset_version": dataset["version"], "dataset": dataset["fingerprint"],
               "new_data_weight": weight}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def plan_dataset(base_path: Path, dataset: dict, store: Any, cache_dir: Path, weight: int,
                 destination: Path) -> tuple[Path, int]:
    """MNIST's prepared splits plus every batch of ``dataset``, as a plan that training and
    evaluation stream from: each batch is fetched into the shard cache unless it is there already
    (keyed by its content digest), and nothing is copied per weight. Returns the plan's path and
    how many objects (packs or batches) were read from the store."""
    from tasks.shards import SPLITS, ShardCache, write_plan

    cache = ShardCache(cache_dir / "shards")
    indexes, fetched = cache.ensure(store, dataset["batches"])
    for split in SPLITS:
        expected = sum(counts[split] for counts in dataset["sources"].values())
        if sum(index["counts"][split] for index in indexes) != expected:
            raise DataError(f"dataset version {dataset['version']}: batches disagree with the version's counts")
    return write_plan(destination, base_path, dataset["version"], weight, cache, indexes), fetched


# --- Prefect task -------------------------------------------------------------
from prefect import task  # noqa: E402

from tasks.results import DatasetUsed, TrainingData  # noqa: E402


# No retries: a corrupt or missing file does not mend itself.
@task(name="prepare-data", timeout_seconds=600)
def prepare_data(data_dir: str | None, cache_dir: str, validation_size: int, split_seed: int,
                 train_limit: int | None = None, dataset_version: int | None = None,
                 new_data_weight: int = 1, use_store: bool = True) -> TrainingData:
    """Verify MNIST, split off a seeded validation set, add the dataset version's new
    examples when ``use_store`` and a store is set (``MNIST_S3_ENDPOINT``), cache the result;
    return its path, fingerprint and the dataset version used."""
    from prefect import get_run_logger

    path, fingerprint = prepare_dataset(Path(data_dir) if data_dir else None, Path(cache_dir),
                                        validation_size, split_seed, train_limit)
    dataset = dataset_to_use(dataset_version) if use_store else None
    if dataset is None:
        get_run_logger().info("training on MNIST alone (no dataset version in the store)")
        return TrainingData(path=str(path), fingerprint=fingerprint)
    combined = combined_fingerprint(fingerprint, dataset, new_data_weight)
    from storage.datasets import DatasetStore
    from storage.settings import DatasetSettings

    plan, fetched = plan_dataset(path, dataset, DatasetStore(DatasetSettings()), Path(cache_dir), new_data_weight,
                                 Path(cache_dir) / f"mnist-{combined[:16]}.plan.json")
    get_run_logger().info("training on MNIST plus dataset version %d (%d new examples in %d batches, sources %s; "
                          "%d objects read from the store, the rest from the local cache)", dataset["version"],
                          dataset["examples"], len(dataset["batches"]), sorted(dataset["sources"]), fetched)
    used = DatasetUsed(**{key: dataset[key] for key in ("version", "fingerprint", "examples", "sources")})
    return TrainingData(path=str(plan), fingerprint=combined, dataset=used)


def dataset_to_use(version: int | None) -> dict | None:
    """The dataset version asked for, else the latest; None without a store or any version."""
    if not S3Settings().s3_endpoint:
        if version is not None:
            raise DataError(f"dataset version {version} asked for, but no store is set (MNIST_S3_ENDPOINT)")
        return None
    from storage.datasets import DatasetStore
    from storage.settings import DatasetSettings

    store = DatasetStore(DatasetSettings())
    return store.version(version) if version is not None else store.latest()
