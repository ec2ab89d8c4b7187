"""The scheduled serving-truth check: the server at MNIST_SERVING_ADDRESS against the registry
(``serving/truth.py``); ``mnist.serving.mismatch`` and a Failed run when they disagree past the
grace period. Wiring only."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.states import Completed, Failed, State

from flows.settings import PipelineSettings


def mismatch_event(store, address: str, problems: list[str]) -> None:
    from tasks.publish import model_resource

    emit_event("mnist.serving.mismatch", resource=model_resource(store),
               payload={"server": address, "problems": problems})


@flow(name="mnist-serving-check", log_prints=True)
def serving_check_flow(grace_seconds: float = 120.0) -> State:
    from mnist_client.client import Target
    from serving.truth import check_serving
    from storage.models import ModelStore, StoreSettings

    address = PipelineSettings().serving_address
    if not address:
        return Completed(message="skipped: MNIST_SERVING_ADDRESS is not set, so there is no server to check")
    store = ModelStore(StoreSettings())
    problems = check_serving(store, Target(address, store.settings.model_name), grace_seconds)
    if problems:
        mismatch_event(store, address, problems)
        return Failed(message="; ".join(problems))
    get_run_logger().info("the server at %s serves what the registry says", address)
    return Completed(message=f"the server at {address} serves what the registry says")
