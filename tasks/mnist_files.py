"""Where the MNIST IDX files are found, without importing the data stage (the CLI reads this at start)."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"


def beside_checkout() -> Path | None:
    """``../shared/datasets/mnist`` next to this checkout, when it holds MNIST (what make uses)."""
    return SHARED_MNIST if (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file() else None


def default_mnist_dir() -> Path | None:
    """MNIST_DATA_DIR, else the MNIST files beside the checkout (as PipelineSettings reads it)."""
    return Path(os.environ["MNIST_DATA_DIR"]) if os.environ.get("MNIST_DATA_DIR") else beside_checkout()
