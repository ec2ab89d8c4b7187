"""The scheduled serving-truth check: the server against the registry (``serving/truth.py``), found
as a training run's live check finds it (MNIST_SERVING_ADDRESS, else the running ``mnist up``
stack of the state folder); ``mnist.serving.mismatch`` and a Failed run when they disagree past
the grace period. Wiring only."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.states import Completed, Failed, State

from serving.stack import live_check_address
from storage.settings import PipelineSettings


def mismatch_event(store, address: str, problems: list[str]) -> None:
    from tasks.publish import model_resource

    emit_event("mnist.serving.mismatch", resource=model_resource(store),
               payload={"server": address, "problems": problems})


@flow(name="mnist-serving-check", log_prints=True)
def serving_check_flow(grace_seconds: float = 120.0) -> State:
    from mnist_client.client import Target
    from serving.truth import check_serving
    from storage.models import ModelStore
    from storage.settings import StoreSettings

    settings = PipelineSettings()
    address, where = live_check_address(settings)
    if not address:
        return Completed(message=f"skipped: no server to check (MNIST_SERVING_ADDRESS is not set and no mnist up "
                                 f"stack runs in {settings.state_dir})")
    get_run_logger().info("checking the server at %s (%s)", address, where)
    store = ModelStore(StoreSettings())
    problems = check_serving(store, Target(address, store.settings.model_name), grace_seconds)
    if problems:
        mismatch_event(store, address, problems)
        return Failed(message="; ".join(problems))
    get_run_logger().info("the server at %s serves what the registry says", address)
    return Completed(message=f"the server at {address} serves what the registry says")
