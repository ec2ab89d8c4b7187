"""Infrastructure settings from the environment (never flow parameters)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.mnist_files import beside_checkout


class PipelineSettings(BaseSettings):
    """``MNIST_DATA_DIR``, ``MNIST_OUTPUT_DIR``, ``MNIST_CACHE_DIR``, ``MNIST_STATE_DIR``,
    ``MNIST_SERVING_ADDRESS``, ``MNIST_LIVE_CHECK_TIMEOUT``, ``MNIST_DASK_SLICE_EXAMPLES``,
    ``MNIST_LOCAL_PREFECT_API``."""

    model_config = SettingsConfigDict(env_prefix="MNIST_", extra="ignore")

    # unset: the MNIST files beside the checkout, as the Makefile finds them; else Keras downloads
    # MNIST (needs internet)
    data_dir: Path | None = Field(default_factory=lambda: beside_checkout())
    output_dir: Path = Path("outputs")
    cache_dir: Path = Path.home() / ".cache" / "mnist-pipeline"
    state_dir: Path = Path(".state")  # embedded S3 store's data, credentials and pid
    serving_address: str | None = None  # HOST:PORT of TF Serving: enables the live check after publish
    live_check_timeout: float = 120.0  # seconds to wait for the new version to become AVAILABLE
    # test-slice examples from which a run scores them on Dask (flows/slices.py), not in its process
    dask_slice_examples: int = Field(1_000_000, ge=1)
    # make prefect's server: where a label moved from the command line is shown (the registry view)
    # when PREFECT_API_URL names no API; "" shows it nowhere until the next flow run
    local_prefect_api: str = "http://127.0.0.1:4200/api"


def live_check_address(settings: PipelineSettings) -> tuple[str | None, str]:
    """Where a run live-checks what it publishes, and why there: MNIST_SERVING_ADDRESS, else the
    gateway of a running ``mnist up`` stack (``make serve``); else None and the reason to say."""
    from serving.stack import running_stack

    if settings.serving_address:
        return settings.serving_address, "MNIST_SERVING_ADDRESS"
    stack = running_stack(settings.state_dir)
    if stack:
        return stack.gateway, f"the serving stack of {settings.state_dir} (mnist up)"
    return None, ("live check skipped: no server to check (MNIST_SERVING_ADDRESS is not set and no mnist up / "
                  "make serve stack runs), so the published version is not known to serve")
