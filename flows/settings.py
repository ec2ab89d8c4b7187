"""Infrastructure settings from the environment (never flow parameters)."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class PipelineSettings(BaseSettings):
    """``MNIST_DATA_DIR``, ``MNIST_OUTPUT_DIR``, ``MNIST_CACHE_DIR``, ``MNIST_STATE_DIR``,
    ``MNIST_SERVING_ADDRESS``, ``MNIST_LIVE_CHECK_TIMEOUT``."""

    model_config = SettingsConfigDict(env_prefix="MNIST_", extra="ignore")

    data_dir: Path | None = None  # unset: Keras downloads MNIST (needs internet)
    output_dir: Path = Path("outputs")
    cache_dir: Path = Path.home() / ".cache" / "mnist-pipeline"
    state_dir: Path = Path(".state")  # embedded S3 store's data, credentials and pid
    serving_address: str | None = None  # HOST:PORT of TF Serving: enables the live check after publish
    live_check_timeout: float = 120.0  # seconds to wait for the new version to become AVAILABLE
