"""Parallel candidates on a real local Dask cluster (prefect-dask): two trained at once, the better
by validation accuracy gated and exported; one candidate runs as before, without Dask."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np

from flows.params import TrainingParams
from tasks.data import load_test_set
from tasks.scoring import evaluate_model

FAST = {"preset": "smoke", "threshold": 0.5, "publish": False}


def child_flow_names(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        return sorted(client.read_flow(run.flow_id).name for run in children)


def test_two_candidates_train_on_dask_and_the_better_by_validation_is_gated(prefect_api, pipeline_env: Path,
                                                                            prepared_path: Path) -> None:
    from flows.training import training_flow

    state = training_flow(TrainingParams(**FAST, candidates=2), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    run_dir = Path(result.run_dir)
    candidates = sorted(run_dir.glob("candidate-*"))
    assert [c.name for c in candidates] == ["candidate-1", "candidate-2"]
    validation = [json.loads((c / "history.json").read_text())["val_accuracy"][-1] for c in candidates]
    seeds = [json.loads((c / "training.json").read_text())["config"]["seed"] for c in candidates]
    assert seeds == [0, 1] and validation[0] != validation[1]  # two different models
    chosen = candidates[int(np.argmax(validation))]
    x_test, y_test = load_test_set(prepared_path)
    assert evaluate_model(keras.models.load_model(chosen / "model.keras"), x_test, y_test).test_accuracy == \
        result.test_accuracy  # the gate scored the chosen candidate
    report = (run_dir / "report.md").read_text()
    assert "## Candidates" in report and report.count("**yes**") == 1
    assert child_flow_names(state.state_details.flow_run_id) == ["mnist-candidates"]


def test_one_candidate_trains_in_the_flow_as_before(prefect_api, pipeline_env: Path) -> None:
    from flows.training import training_flow

    state = training_flow(TrainingParams(**FAST), return_state=True)
    assert state.is_completed(), state.message
    run_dir = Path(state.result().run_dir)
    assert (run_dir / "model.keras").is_file() and not list(run_dir.glob("candidate-*"))
    assert child_flow_names(state.state_details.flow_run_id) == []
