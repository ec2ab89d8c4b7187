"""Shared fixtures: real MNIST, a real Prefect API, small trained models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST IDX files: MNIST_DATA_DIR, else ../shared/datasets/mnist."""
    path = Path(os.environ.get("MNIST_DATA_DIR") or REPO.parent / "shared" / "datasets" / "mnist")
    if not (path / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"real MNIST not found at {path}: set MNIST_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prepared-cache")


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (temporary server on SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def pipeline_env(monkeypatch: pytest.MonkeyPatch, mnist_dir: Path, cache_dir: Path, tmp_path: Path) -> Path:
    """Point the pipeline's settings at real MNIST, a shared cache and a fresh output dir."""
    monkeypatch.setenv("MNIST_DATA_DIR", str(mnist_dir))
    monkeypatch.setenv("MNIST_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("MNIST_OUTPUT_DIR", str(tmp_path / "outputs"))
    return tmp_path / "outputs"


@pytest.fixture(scope="session")
def prepared_path(mnist_dir: Path, cache_dir: Path) -> Path:
    from tasks.data import prepare_dataset

    path, _ = prepare_dataset(mnist_dir, cache_dir, validation_size=5000, split_seed=0)
    return path


@pytest.fixture(scope="session")
def smoke_model(prepared_path: Path):
    """A model trained for seconds on 2,000 images: enough to be a real, non-trivial model."""
    from tasks.data import load_prepared
    from tasks.train import PRESETS, train_model

    model, _ = train_model(load_prepared(prepared_path), PRESETS["smoke"].model_copy(update={"train_limit": None}))
    return model
