"""Shared fixtures: real MNIST, a real Prefect API, small trained models."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]
# The checkout's Prefect home, as make test sets it: the mnist commands tests start share one
# migrated database instead of each migrating one under its test's state dir.
os.environ.setdefault("PREFECT_HOME", str(REPO / ".state" / "prefect"))
# a registry command run by a test shows its label move in no Prefect UI a person has open on :4200
os.environ.setdefault("MNIST_LOCAL_PREFECT_API", "")
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)


def run_mnist(*args: str, env: dict[str, str] | None = None, timeout: float = 600
              ) -> subprocess.CompletedProcess[str]:
    """The ``mnist`` command in a child process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def stopped_by_sigterm(process: subprocess.Popen, timeout: float = 60) -> str:
    """SIGTERM a started ``mnist`` process, as a supervisor stops it, and return its output;
    SIGKILL its process group if it outlives ``timeout``."""
    import signal

    try:
        process.send_signal(signal.SIGTERM)
        return process.communicate(timeout=timeout)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process.stdout:
            process.stdout.close()


def metric_values(page: str, name: str) -> dict[tuple, float]:
    """The samples named ``name`` on a Prometheus page, by their sorted (label, value) pairs."""
    from prometheus_client.parser import text_string_to_metric_families

    return {tuple(sorted(sample.labels.items())): sample.value for family in text_string_to_metric_families(page)
            for sample in family.samples if sample.name == name}


def stack_addresses(process: subprocess.Popen, lines: list[str]) -> tuple[str, str]:
    """Read mnist up's banner from its stdout (kept in ``lines``) until it names its addresses:
    the gateway's gRPC HOST:PORT and its REST base URL."""
    while not any("export MNIST_SERVING_ADDRESS=" in line for line in lines):
        line = process.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
    gateway = next(line for line in lines if "export MNIST_SERVING_ADDRESS=" in line).split("=", 1)[1].strip()
    rest = next(line for line in lines if "gateway " in line).split("REST ")[1].split()[0]
    return gateway, rest


def wait_for(condition, timeout: float = 60, interval: float = 0.2) -> None:
    """Poll ``condition`` until it holds; fail the test when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(interval)


def start_model_server(base: Path, batching=None, retries=None, **options):
    """The local gRPC server, in process, on a free loopback port, serving ``base`` as
    model ``mnist`` (polling every 0.2 s unless told; ``batching``: BatchingOptions;
    ``retries``: LoadRetries, else a load that fails is not retried); returns it and its address."""
    from serving.model_server.manager import LoadOptions, LoadRetries, ModelManager
    from serving.model_server.model_config import single_model_config
    from serving.model_server.server import ModelServer, ServerOptions
    from storage.embedded import free_port

    port = free_port()
    loading = LoadOptions(batching=batching, retries=retries or LoadRetries(max_retries=0))
    manager = ModelManager(single_model_config("mnist", base.resolve()), loading=loading)
    server = ModelServer(manager, ServerOptions(port=port, **{"poll_seconds": 0.2, **options})).start()
    return server, f"127.0.0.1:{port}"


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
    monkeypatch.setenv("MNIST_STATE_DIR", str(tmp_path / "state"))  # never a make serve stack of the checkout
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
    from tasks.recipes import PRESETS
    from tasks.train import train_model

    model, _ = train_model(load_prepared(prepared_path), PRESETS["smoke"].model_copy(update={"train_limit": None}))
    return model


@pytest.fixture(scope="module")
def test_images(prepared_path: Path):
    """MNIST's test images and labels, as the prepared cache holds them."""
    from tasks.data import load_test_set

    return load_test_set(prepared_path)


@pytest.fixture()
def model_base(saved_model_dir: Path, tmp_path: Path) -> Path:
    """A model directory serving the smoke model as version 1."""
    import shutil

    base = tmp_path / "models" / "mnist"
    shutil.copytree(saved_model_dir, base / "1")
    return base


# --- a real S3 store (SeaweedFS) -----------------------------------------------
S3_ACCESS_KEY = "testaccess"
S3_SECRET_KEY = "test-secret-Zq81x"  # distinctive, so a leak is easy to grep for


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """One SeaweedFS for the session, on free loopback ports, stopped by its pid."""
    from storage.embedded import start_weed

    weed = start_weed(tmp_path_factory.mktemp("seaweedfs"), S3_ACCESS_KEY, S3_SECRET_KEY)
    yield weed
    weed.stop()


@pytest.fixture()
def store_env(s3_server, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> dict[str, str]:
    """A fresh bucket per test, reached through the same variables users set."""
    import re
    import uuid

    bucket = re.sub(r"[^a-z0-9-]", "-", f"t-{request.node.name.lower()}")[:40] + "-" + uuid.uuid4().hex[:8]
    env = {"MNIST_S3_ENDPOINT": s3_server.endpoint, "MNIST_S3_BUCKET": bucket, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
           "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "AWS_REGION": "us-east-1", "MNIST_RETRY_SECONDS": "20"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture()
def store(store_env):
    from storage.models import ModelStore
    from storage.settings import StoreSettings

    return ModelStore(StoreSettings())


@pytest.fixture(scope="session")
def saved_model_dir(smoke_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tasks.export import export_saved_model

    return export_saved_model(smoke_model, tmp_path_factory.mktemp("export") / "mnist" / "1")


@pytest.fixture()
def trusted_stable(store_env, saved_model_dir: Path) -> int:
    """The smoke model published as ``stable``, trained on MNIST alone: what the data screen
    checks new examples against (tasks/screen.py)."""
    from storage.models import ModelStore
    from storage.settings import StoreSettings

    store = ModelStore(StoreSettings())
    version = store.publish(saved_model_dir, {"dataset": None, "metrics": {}})["version"]
    store.set_label("stable", version)
    return version


def prefect_events(name: str, since, timeout: float = 30.0, expect: bool = True) -> list[dict]:
    """Events named ``name`` that reached the Prefect API since ``since`` (waiting up to ``timeout``
    for the first one when ``expect``, as events are delivered in the background)."""
    import time

    import httpx
    from prefect.settings import PREFECT_API_URL

    deadline = time.monotonic() + timeout
    while True:
        reply = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json={
            "filter": {"event": {"name": [name]}, "occurred": {"since": since.isoformat()}}})
        reply.raise_for_status()
        events = reply.json()["events"]
        if events or not expect or time.monotonic() > deadline:
            return events
        time.sleep(0.5)
