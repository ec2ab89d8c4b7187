"""The whole chain for ``make run``: store → the serving stack (server, sync sidecar, logging
gateway; ``serving/stack.py``) → training flow (publish, live check) → gRPC queries through the
gateway → the answers shown → everything it started stopped again (the gateway flushing its logs
first)."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

from serving.stack import serving_stack
from storage.embedded import exclusive_lock, store_environment
from storage.errors import MnistError
from storage.settings import patched_environ
from tasks.results import SkippedRun, TrainingResult

LABEL_TIMEOUT = 30.0  # seconds for the served label to follow a published version


class TrainingRunFailed(MnistError):
    """A training run that failed or that its gate rejected: the state's name and message."""


def run_training(params: Any, api_ready: Callable[[], None] | None = None) -> TrainingResult | SkippedRun:
    """Run the training flow with a reachable store; raise TrainingRunFailed on a failed or rejected
    run. ``api_ready``: the wait for a Prefect API the caller started (else one is started here, if
    none is set). The flow's modules import TensorFlow, so they are imported while the API starts."""
    from flows.prefect_api import early_prefect_api
    from storage.settings import PipelineSettings

    api = nullcontext(api_ready) if api_ready else early_prefect_api()
    with api as api_ready:
        from flows.training import training_flow
        from tasks.gate import REJECTED

        api_ready()
        if params.publish:
            with store_environment(PipelineSettings().state_dir):
                state = training_flow(params, return_state=True)
        else:
            state = training_flow(params, return_state=True)
    if not state.is_completed() or state.name == REJECTED:
        raise TrainingRunFailed(f"training run {state.name}: {state.message}")
    result = state.result()
    if not isinstance(result, (TrainingResult, SkippedRun)):
        raise TrainingRunFailed(f"training run {state.name} ended without a result: {state.message}")
    return result


@contextmanager
def run_chain(params: Any, state_dir: Path, queries: tuple[int, int] = (0, 10)
              ) -> Iterator[tuple[TrainingResult | SkippedRun, list[dict[str, Any]]]]:
    """Train and publish with the serving stack running, then query ``stable`` through the gateway.
    Yields the run's result and the answers while all still runs: they are shown before the 2 s or
    so of stopping it (the gateway's last logs, the store, the Prefect API). ``queries``: the
    MNIST test digits [start, stop) to ask about."""
    from flows.prefect_api import early_prefect_api
    from mnist_client.client import ServingError, Target, predict, wait_for_label
    from storage.settings import PipelineSettings, StoreSettings
    from tasks.data import mnist_test_digits

    with ExitStack() as stack:
        # the Prefect API first: the flow waits for it, while the stack needs to answer only at the live
        # check (which waits for it), so the stack starts while TensorFlow imports and the run trains
        # one chain per state dir at a time: its stack's model directory, logs and stack.json are the
        # state dir's; a second mnist run waits for the first rather than failing beside it
        stack.enter_context(exclusive_lock(state_dir / "serving" / "run.lock",
                                           waiting=f"waiting for the other mnist run in {state_dir} to finish"))
        api_ready = stack.enter_context(early_prefect_api())
        stack.enter_context(store_environment(state_dir))
        serving, ready = stack.enter_context(serving_stack(state_dir, wait=False))
        stack.enter_context(patched_environ({"MNIST_SERVING_ADDRESS": serving.gateway}))
        try:
            result = run_training(params, api_ready)
        finally:
            ready()  # a part of the stack that did not start is the cause to name, not a live check it failed
        model_name = StoreSettings().model_name
        published = result.published.version if isinstance(result, TrainingResult) and result.published else None
        # the live check asked for the version; the label follows at the server's next config poll
        named = wait_for_label(Target(serving.gateway, model_name, label="stable"), published, LABEL_TIMEOUT)
        if named is None or published not in (None, named):
            raise ServingError(f"the server did not take label 'stable' for version {published} within "
                               f"{LABEL_TIMEOUT:g}s (it names version {named})")
        names, images, labels = mnist_test_digits(PipelineSettings().data_dir, *queries)
        answers = predict(images, address=serving.gateway, model_name=model_name, label="stable", names=names)
        yield result, [{**answer, "label": label} for answer, label in zip(answers, labels)]
