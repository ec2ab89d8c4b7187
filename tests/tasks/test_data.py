"""The data stage on real MNIST, and on corrupt, truncated and inconsistent files."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from tasks.data import (
    IMAGES_MAGIC,
    LABELS_MAGIC,
    MNIST_SHA256,
    DataError,
    load_mnist_idx,
    load_prepared,
    prepare_dataset,
    split_train_validation,
)

NAMES = list(MNIST_SHA256)


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_small_mnist(directory: Path, train_images: int, train_labels: int) -> dict[str, str]:
    """Four structurally valid IDX files; returns their digests for the check."""
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": idx_bytes(IMAGES_MAGIC, rng.integers(0, 256, (train_images, 28, 28))),
        "train-labels-idx1-ubyte": idx_bytes(LABELS_MAGIC, rng.integers(0, 10, train_labels)),
        "t10k-images-idx3-ubyte": idx_bytes(IMAGES_MAGIC, rng.integers(0, 256, (5, 28, 28))),
        "t10k-labels-idx1-ubyte": idx_bytes(LABELS_MAGIC, rng.integers(0, 10, 5)),
    }
    for name, raw in files.items():
        (directory / name).write_bytes(raw)
    return {name: hashlib.sha256(raw).hexdigest() for name, raw in files.items()}


@pytest.fixture()
def mnist_copy(mnist_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "mnist"
    shutil.copytree(mnist_dir, target)
    return target


def test_reads_real_mnist_with_expected_shapes_and_digests(mnist_dir: Path) -> None:
    train, test, digests = load_mnist_idx(mnist_dir)
    assert train.images.shape == (60000, 28, 28) and train.labels.shape == (60000,)
    assert test.images.shape == (10000, 28, 28) and test.labels.shape == (10000,)
    assert set(np.unique(test.labels)) == set(range(10))
    assert digests == MNIST_SHA256


def test_reads_uncompressed_files_too(mnist_dir: Path, tmp_path: Path) -> None:
    for name in NAMES:
        with gzip.open(mnist_dir / f"{name}.gz") as source:
            (tmp_path / name).write_bytes(source.read())
    train, test, _ = load_mnist_idx(tmp_path)
    assert train.images.shape[0] == 60000 and test.labels.shape[0] == 10000


def test_changed_byte_is_a_digest_mismatch_naming_the_file(mnist_copy: Path) -> None:
    path = mnist_copy / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(path) as source:
        raw = bytearray(source.read())
    raw[100] = (raw[100] + 1) % 10
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: SHA-256 mismatch"):
        load_mnist_idx(mnist_copy)


def test_truncated_gzip_is_refused(mnist_copy: Path) -> None:
    path = mnist_copy / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:50000])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: cannot read"):
        load_mnist_idx(mnist_copy)


def test_truncated_raw_file_is_refused(mnist_copy: Path) -> None:
    (mnist_copy / "train-labels-idx1-ubyte.gz").unlink()
    (mnist_copy / "train-labels-idx1-ubyte").write_bytes(idx_bytes(LABELS_MAGIC, np.zeros(60000))[:30000])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: truncated"):
        load_mnist_idx(mnist_copy)


def test_wrong_magic_number_is_refused(mnist_copy: Path) -> None:
    (mnist_copy / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(LABELS_MAGIC, np.zeros(10))))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: wrong magic number 0x00000801"):
        load_mnist_idx(mnist_copy)


def test_missing_file_is_named(mnist_copy: Path) -> None:
    (mnist_copy / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte"):
        load_mnist_idx(mnist_copy)


def test_image_and_label_counts_must_agree(tmp_path: Path) -> None:
    digests = write_small_mnist(tmp_path, train_images=20, train_labels=19)
    with pytest.raises(DataError, match="train has 20 images but 19 labels"):
        load_mnist_idx(tmp_path, expected_digests=digests)


def test_no_training_starts_on_bad_data(mnist_copy: Path, tmp_path: Path) -> None:
    (mnist_copy / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError):
        prepare_dataset(mnist_copy, tmp_path / "cache", 5000, 0)
    assert not (tmp_path / "cache").exists()


def test_split_is_seeded_disjoint_and_leaves_the_test_set_alone(mnist_dir: Path) -> None:
    train, _, _ = load_mnist_idx(mnist_dir)
    part_a, val_a = split_train_validation(train, 5000, seed=7)
    part_b, val_b = split_train_validation(train, 5000, seed=7)
    _, val_c = split_train_validation(train, 5000, seed=8)
    assert np.array_equal(val_a.images, val_b.images) and np.array_equal(part_a.labels, part_b.labels)
    assert not np.array_equal(val_a.images, val_c.images)
    assert len(part_a.labels) == 55000 and len(val_a.labels) == 5000


def test_prepared_data_is_cached_on_its_inputs(mnist_dir: Path, tmp_path: Path) -> None:
    first, fingerprint = prepare_dataset(mnist_dir, tmp_path, 5000, 0)
    written = first.stat().st_mtime_ns
    again, same_fingerprint = prepare_dataset(mnist_dir, tmp_path, 5000, 0)
    other, other_fingerprint = prepare_dataset(mnist_dir, tmp_path, 5000, 1)
    assert again == first and same_fingerprint == fingerprint and first.stat().st_mtime_ns == written
    assert other != first and other_fingerprint != fingerprint
    data = load_prepared(first)
    assert data.x_train.dtype == np.float32 and data.x_train.shape == (55000, 28, 28, 1)
    assert 0.0 <= data.x_test.min() and data.x_test.max() <= 1.0 and data.x_test.shape[0] == 10000
