"""The whole chain for ``make run``: store → server + sync sidecar + logging gateway → training
flow (publish, live check) → gRPC queries through the gateway → everything it started stopped
again (the gateway flushing its logs first)."""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

from storage.embedded import free_port, patched_environ, stop_process, store_environment
from serving.sync import sync_once


class ChainError(RuntimeError):
    """A part of the chain did not start."""


@contextmanager
def background_cli(args: list[str], log_path: Path, ready_text: str | None = None,
                   timeout: float = 180.0) -> Iterator[None]:
    """Run ``mnist ARGS`` in its own process group for the block, logging to ``log_path``;
    with ``ready_text``, wait until the log shows it. Stopped by its pid whatever happens."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while ready_text and ready_text not in log_path.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise ChainError(f"mnist {args[0]} did not start (exit {process.poll()}); see {log_path}")
            time.sleep(0.2)
        yield
    finally:
        stop_process(process.pid)
        process.wait(timeout=10)


def run_chain(params: Any, state_dir: Path, queries: str = "0:10") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train and publish with a live server and sync sidecar, then query ``stable`` over gRPC."""
    from flows.cli import run_training
    from flows.cli_serving import mnist_test_inputs
    from mnist_client.client import predict
    from storage.models import ModelStore, StoreSettings

    serving_root = (state_dir / "serving").resolve()
    with ExitStack() as stack:
        stack.enter_context(store_environment(state_dir))
        store = ModelStore(StoreSettings())
        store.ensure_bucket()
        model_dir = serving_root / store.settings.model_name
        sync_once(store, model_dir)  # the server starts on what is already published
        address = f"127.0.0.1:{free_port()}"
        stack.enter_context(background_cli(
            ["serve", "--port", address.split(":")[1], "--model-config-file", str(serving_root / "models.config"),
             "--allow-version-labels-for-unavailable-models"],  # restart on a config with labels, as in production
            serving_root / "serve.log", ready_text="listening on"))
        stack.enter_context(background_cli(
            ["sync", "--model-base-path", str(model_dir), "--watch", "--interval", "1", "--server", address],
            serving_root / "sync.log"))
        gateway = f"127.0.0.1:{free_port()}"  # clients call the gateway, as in production
        stack.enter_context(background_cli(
            ["gateway", "--upstream", address, "--port", gateway.split(":")[1], "--log-flush-seconds", "1"],
            serving_root / "gateway.log", ready_text="listening on"))
        stack.enter_context(patched_environ({"MNIST_SERVING_ADDRESS": gateway}))
        result = run_training(params)
        names, images, labels = mnist_test_inputs(queries)
        answers = predict(images, address=gateway, model_name=store.settings.model_name, label="stable",
                          names=names)
        return result, [{**answer, "label": label} for answer, label in zip(answers, labels)]
