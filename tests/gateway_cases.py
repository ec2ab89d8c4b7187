"""What the gateway's tests share: digits, a local server upstream, a gateway on a real store with
three callers' feedback tokens, and reading back what it logged."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from serving.gateway.callers import Caller, Credential
from serving.gateway.server import Gateway, GatewayOptions
from serving.model_server.model_config import single_model_config
from storage.embedded import free_port
from storage.logs import FeedbackStore, PredictionLogStore
from storage.settings import TrafficSettings
from tasks.data import load_test_set
from tests.conftest import start_model_server
from tests.conftest import wait_for as conftest_wait_for


@pytest.fixture(scope="module")
def digits(prepared_path: Path) -> np.ndarray:
    return load_test_set(prepared_path)[0][:64]


@pytest.fixture()
def upstream(saved_model_dir: Path, tmp_path: Path):
    """The local server (gRPC and REST, metrics on) with version 1 labelled ``stable``."""
    base = tmp_path / "models" / "mnist"
    shutil.copytree(saved_model_dir, base / "1")
    rest_port = free_port()
    server, address = start_model_server(base, rest_api_port=rest_port,
                                         metrics_path="/monitoring/prometheus/metrics")
    config = single_model_config("mnist", base.resolve())
    config.model_config_list.config[0].version_labels["stable"] = 1
    server.manager.apply_config(config)
    yield server, address, f"127.0.0.1:{rest_port}"
    server.stop(grace=1)


def stores(retry_seconds: float = 20.0) -> tuple[PredictionLogStore, FeedbackStore]:
    settings = TrafficSettings().model_copy(update={"retry_seconds": retry_seconds})
    logs = PredictionLogStore(settings)
    logs.ensure_bucket()
    return logs, FeedbackStore(settings)


# who may send feedback in these tests: a trusted labeller and two untrusted apps
LABELLER = Credential(b"labeller-token-9f3c1e77a2b4d8e6", Caller("labeller", trusted=True))
APP_A = Credential(b"app-a-token-55e1c2d3b4a59687", Caller("app-a", trusted=False))
APP_B = Credential(b"app-b-token-0a1b2c3d4e5f6a7b", Caller("app-b", trusted=False))


def bearer(credential: Credential) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential.token.decode()}"}


def start_gateway(upstream_address: str, upstream_rest: str | None = None, **options) -> Gateway:
    logs, feedback = stores(options.pop("retry_seconds", 20.0))
    settings = GatewayOptions(upstream=upstream_address, upstream_rest=upstream_rest, rest_port=free_port(),
                              **{"flush_seconds": 0.2, "credentials": (LABELLER, APP_A, APP_B), **options})
    return Gateway(settings, logs, feedback).start()


def wait_for(condition) -> None:
    conftest_wait_for(condition, timeout=30.0, interval=0.05)


def logged(logs: PredictionLogStore) -> list:
    return [item for key in logs.batch_keys([time.strftime("%Y-%m-%d", time.gmtime())])
            for item in logs.read_batch(key)]
