"""Several candidates at once on Dask (prefect-dask's DaskTaskRunner): the same recipe with seeds
seed, seed+1, ...; the best by *validation* accuracy goes on to the gate, the test set never
chooses. A LocalCluster sized to the machine, or the cluster at MNIST_DASK_ADDRESS (for example
one dask-kubernetes started; its workers need the run folder and the prepared data at the same
paths, a shared volume). Wiring only: each candidate is the ``train`` task."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from storage.settings import PipelineSettings
from tasks.recipes import TrainConfig
from tasks.results import Candidate, TrainedModel
from tasks.train import train


def dask_runner(count: int):
    from prefect_dask import DaskTaskRunner

    address = PipelineSettings().dask_address
    if address:
        return DaskTaskRunner(address=address)
    cores = os.cpu_count() or 1
    workers = max(1, min(count, cores))
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": max(1, cores // workers),
                                          "processes": True, "dashboard_address": None})


def best_by_validation(results: list[TrainedModel]) -> TrainedModel:
    """The candidate with the highest validation accuracy (the first of equals)."""
    return max(results, key=lambda result: (result.val_accuracy or 0.0, -results.index(result)))


@flow(name="mnist-candidates", log_prints=True)
def candidates_flow(prepared_path: str, config: TrainConfig, run_dir: str, count: int) -> TrainedModel:
    futures = [train.submit(prepared_path, config.model_copy(update={"seed": config.seed + index}),
                            str(Path(run_dir) / f"candidate-{index + 1}")) for index in range(count)]
    results = [future.result() for future in futures]
    best = best_by_validation(results)
    for name in ("history.json", "training.json"):  # the run's report describes the chosen one
        shutil.copy(Path(best.model_path).parent / name, Path(run_dir) / name)
    candidates = tuple(Candidate(seed=result.seed, val_accuracy=result.val_accuracy or 0.0, chosen=result is best)
                       for result in results)
    rows = [{"candidate": index + 1, "seed": candidate.seed, "validation accuracy": round(candidate.val_accuracy, 5),
             "chosen": "yes" if candidate.chosen else ""} for index, candidate in enumerate(candidates)]
    create_table_artifact(rows, key="mnist-candidates", description="Candidates, chosen by validation accuracy")
    get_run_logger().info("chose seed %d: validation accuracy %.4f (of %s)", best.seed, best.val_accuracy or 0.0,
                          ", ".join(f"{candidate.val_accuracy:.4f}" for candidate in candidates))
    return best.model_copy(update={"candidates": candidates})


def train_candidates(prepared_path: str, config: TrainConfig, run_dir: str, count: int) -> TrainedModel:
    """``count`` candidates trained at once on Dask; the chosen one's paths, and all of them."""
    return candidates_flow.with_options(task_runner=dask_runner(count))(prepared_path, config, run_dir, count)
