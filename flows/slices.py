"""Test slices scored on Dask (prefect-dask's DaskTaskRunner), for a dataset version whose slices
outgrow one machine's evaluation: the version's cached test shards are split into groups, each
group is scored by one task on a worker (the candidate loaded once per task, records read a chunk
at a time), and the confusion matrices are added up, so the result is the one ``evaluate`` gives.
Workers need the run folder and the shard cache at the same paths (a LocalCluster, or a shared
volume under the cluster at MNIST_DASK_ADDRESS). Wiring only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import flow, task

from flows.candidates import dask_runner
from tasks.results import SliceScores


@task(name="score-shards", timeout_seconds=3600)
def score_shards(model_path: str, shards: list[tuple[str, str]]) -> dict[str, list[list[int]]]:
    """The confusion matrix of each source over one group of (source, test record file)."""
    from tasks.data import to_model_input
    from tasks.model import load_saved_model
    from tasks.scoring import confusion_by_source
    from tasks.shards import read_records

    model = load_saved_model(model_path)
    chunks = ((source, to_model_input(images), labels) for source, path in shards
              for images, labels in read_records(path))
    matrices = confusion_by_source(lambda images: model.predict(images, batch_size=1024, verbose=0), chunks)
    return {source: matrix.tolist() for source, matrix in matrices.items()}


def shard_groups(shards: list[tuple[str, str]], groups: int) -> list[list[tuple[str, str]]]:
    """Round-robin groups: each about the same number of shards."""
    return [group for group in (shards[index::groups] for index in range(groups)) if group]


@flow(name="mnist-slice-scoring", log_prints=True)
def slice_scoring_flow(model_path: str, prepared_path: str, groups: int) -> dict[str, SliceScores]:
    from tasks.scoring import scores_of
    from tasks.shards import read_plan

    plan = read_plan(Path(prepared_path))
    shards = [(shard["source"], shard["files"]["test"]) for shard in plan.shards if shard["counts"]["test"]]
    futures = [score_shards.submit(model_path, group) for group in shard_groups(shards, groups)]
    totals: dict[str, np.ndarray] = {}
    for future in futures:
        for source, matrix in future.result().items():
            totals[source] = totals.get(source, 0) + np.asarray(matrix, dtype=np.int64)
    return {source: scores_of(matrix) for source, matrix in sorted(totals.items())}


def score_slices_on_dask(model_path: str, prepared_path: str, workers: int) -> dict[str, SliceScores]:
    """Every test slice of the plan at ``prepared_path`` scored on Dask with ``workers`` workers."""
    return slice_scoring_flow.with_options(task_runner=dask_runner(workers))(model_path, prepared_path, workers)
