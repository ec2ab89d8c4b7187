"""Flow overhead: one end-to-end training flow (default preset, publishing to a
local SeaweedFS) against the time spent in its tasks, task by task."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.common import save, table


def task_durations(flow_run_id) -> dict[str, float]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     limit=200, offset=0)
    durations: dict[str, float] = {}
    for run in runs:
        if run.start_time and run.end_time:
            name = run.name.rsplit("-", 1)[0]  # "train-a1b" -> "train"
            durations[name] = (run.end_time - run.start_time).total_seconds()
    return durations


def main() -> dict:
    from flows.params import TrainingParams
    from flows.training import training_flow
    from storage.embedded import start_weed
    from storage.settings import patched_environ

    with tempfile.TemporaryDirectory() as scratch:
        weed = start_weed(Path(scratch) / "s3", "bench", "bench-secret-key")
        store = {"MNIST_S3_ENDPOINT": weed.endpoint, "AWS_ACCESS_KEY_ID": "bench",
                 "AWS_SECRET_ACCESS_KEY": "bench-secret-key", "AWS_REGION": "us-east-1",
                 "MNIST_OUTPUT_DIR": str(Path(scratch) / "outputs")}
        try:
            with patched_environ(store):  # the benches after this one must not find a stopped store
                started = time.perf_counter()
                state = training_flow(TrainingParams(), return_state=True)
                wall = time.perf_counter() - started
                durations = task_durations(state.state_details.flow_run_id)
        finally:
            weed.stop()
    in_tasks = sum(durations.values())
    core = durations.get("train", 0.0) + durations.get("evaluate", 0.0)
    rows = [[name, seconds, 100 * seconds / wall] for name, seconds in sorted(durations.items(), key=lambda x: -x[1])]
    rows += [["(outside tasks: engine, API, imports)", wall - in_tasks, 100 * (wall - in_tasks) / wall],
             ["flow wall time", wall, 100.0]]
    print(table(["part", "seconds", "% of flow"], rows))
    print(f"training + evaluation: {core:.1f}s of {wall:.1f}s; everything else: {wall - core:.1f}s "
          f"({100 * (wall - core) / wall:.0f}%)")
    path = save("flow", {"flow_wall_seconds": wall, "task_seconds": durations, "state": state.name,
                         "train_and_evaluate_seconds": core})
    print(f"written {path}")
    return {"wall": wall, "tasks": durations}


if __name__ == "__main__":
    main()
