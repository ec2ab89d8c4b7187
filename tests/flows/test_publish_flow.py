"""The training flow with the model store: champion/challenger gate, labels, no leaked secrets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    LogFilter,
    LogFilterFlowRunId,
    TaskRunFilter,
)
from prefect.client.schemas.sorting import ArtifactSort
from prefect.logging.handlers import APILogHandler

from flows.params import TrainingParams
from storage.models import ModelStore
from tasks.gate import champion_checks, paired_noise
from tasks.results import StableScores, TestScores
from tests.conftest import S3_SECRET_KEY

SMOKE = {"preset": "smoke", "threshold": 0.5}


def test_champion_checks_allow_margins_and_catch_a_class_drop() -> None:
    champion = StableScores.model_construct(version=3, test_accuracy=0.992, per_class_accuracy=[0.99] * 10,
                                            misclassified=list(range(80)))
    close = TestScores.model_construct(test_accuracy=0.9915, per_class_accuracy=[0.985] * 10,
                                       misclassified=list(range(85)), num_examples=10000)
    assert all(check.passed for check in champion_checks(close, champion, 0.001, 0.01))
    dropped = TestScores.model_construct(test_accuracy=0.992, per_class_accuracy=[0.99] * 9 + [0.97],
                                         misclassified=list(range(80)), num_examples=10000)
    failed = [c.name for c in champion_checks(dropped, champion, 0.001, 0.01) if not c.passed]
    assert failed == ["digit 9 vs stable (class accuracy - 0.01)"]
    assert champion_checks(close, None, 0.001, 0.01) == []


def test_a_drop_within_seed_noise_passes_and_a_confident_one_is_rejected() -> None:
    """Paired on the same 10,000 digits: another seed 18 digits worse, with 24 newly wrong and 6
    newly right, is within the noise; 30 worse with no digit newly right is not."""
    champion = StableScores.model_construct(version=3, test_accuracy=0.9943, per_class_accuracy=[0.99] * 10,
                                            misclassified=list(range(57)))
    seed = TestScores.model_construct(test_accuracy=0.9925, per_class_accuracy=[0.99] * 10, num_examples=10000,
                                      misclassified=list(range(6, 57)) + list(range(1000, 1024)))
    [accuracy, *_] = champion_checks(seed, champion, 0.001, 0.01)
    assert paired_noise(seed, champion) == pytest.approx(1.645 * np.sqrt((30 / 10000 - 0.0018 ** 2) / 10000))
    assert accuracy.passed and accuracy.name == "not worse than stable v3 (accuracy - 0.001 - 0.0009 paired noise)"
    worse = TestScores.model_construct(test_accuracy=0.9913, per_class_accuracy=[0.99] * 10, num_examples=10000,
                                       misclassified=list(range(57)) + list(range(1000, 1030)))
    assert not champion_checks(worse, champion, 0.001, 0.01)[0].passed


def flow_run_texts(flow_run_id) -> list[str]:
    APILogHandler().flush()  # logs reach the API in the background
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                limit=200, offset=0)
        # every argument explicit: this server refuses the nulls the client sends for omitted ones
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])),
            flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(), sort=ArtifactSort.CREATED_DESC,
            limit=200, offset=0)
    return ([str(run.parameters)] + [log.message for log in logs]
            + [str(artifact.data) + str(artifact.description) for artifact in artifacts])


def test_flow_publishes_then_labels_canary_without_leaking_credentials(prefect_api, pipeline_env: Path,
                                                                        store: ModelStore) -> None:
    from flows.training import training_flow

    first = training_flow(TrainingParams(**SMOKE), return_state=True)
    assert first.is_completed(), first.message
    published = first.result().published
    assert published.model_dump(exclude={"overview"}) == {
        "version": 1, "uri": store.uri(1), "label": "stable", "show": "mnist registry show 1"}
    assert published.overview is None or "/artifacts/artifact/" in published.overview
    report = (Path(first.result().run_dir) / "report.md").read_text()
    assert "live check skipped: no server to check" in report  # said, not left out
    skipped = "not checked: the comparisons with stable (accuracy, each digit, slices, answers moved, backdoor " \
              "inspection): no version is stable yet, the accuracy gate alone judges the first"
    assert skipped in first.result().gate and f"| {skipped} |" in report
    # one smoke epoch is not reproducible to a hundredth per digit from run to run (threaded float
    # kernels: 0.72 then 0.76 here once, with digit 6 down 0.05): wide margins keep the champion
    # checks in the gate without this test turning on that noise
    second = training_flow(TrainingParams(**SMOKE, publish_label="canary", force=True, accuracy_margin=1.0,
                                          class_margin=1.0, slice_margin=1.0, moved_margin=1.0, shortcut_follow=0.0),
                           return_state=True)
    assert second.is_completed(), second.message
    assert any("not worse than stable v1" in check for check in second.result().gate)
    assert "not checked: the backdoor inspection: --shortcut-follow 0" in second.result().gate
    assert store.labels() == {"stable": 1, "canary": 2}
    manifest = store.verify(2)
    assert manifest["flow_run_id"] == str(second.state_details.flow_run_id)
    assert len(manifest["data_fingerprint"]) == 64 and manifest["library_versions"]["tensorflow"]
    texts = flow_run_texts(first.state_details.flow_run_id) + flow_run_texts(second.state_details.flow_run_id)
    assert any("published" in text for text in texts)
    assert not [text for text in texts if S3_SECRET_KEY in text]
    assert S3_SECRET_KEY not in str(store.history()) + str(manifest)


def test_worse_challenger_is_rejected_and_recorded(prefect_api, pipeline_env: Path, store: ModelStore,
                                                  saved_model_dir: Path) -> None:
    from flows.training import training_flow
    from tasks.publish import publish_model

    stable_metrics = {"test_accuracy": 0.97, "test_loss": 0.1, "per_class_accuracy": [0.97] * 10}
    publish_model(store, saved_model_dir, stable_metrics, {"flow_run_id": "seeded"}, "stable")
    state = training_flow(TrainingParams(**SMOKE), return_state=True)
    assert state.name == "Rejected"
    assert "not worse than stable v1" in state.message and "failed" in state.message
    # short, for the state badge's tooltip and the runs list; the report tables every failing check
    assert len(state.message) < 300 and "more failing checks (see the report)" in state.message, state.message
    report = next((pipeline_env / "runs").iterdir()).joinpath("report.md").read_text()
    verdict, failing = report.split("| failing check | value | limit |")[0], report.split("## Gate")[0]
    assert "**Verdict:** rejected: " in verdict and failing.count("| digit ") >= 3, report[:1500]
    assert store.complete_versions() == [1] and store.labels() == {"stable": 1}
    rejected = [event for event in store.history() if event["event"] == "rejected"]
    assert len(rejected) == 1 and rejected[0]["flow_run_id"] == str(state.state_details.flow_run_id)
    assert rejected[0]["reason"] == state.message  # said once: the history prints "rejected: <reason>"
    assert not (pipeline_env / "mnist").exists()


def test_the_rollback_flow_moves_stable_back_and_says_from_where(prefect_api, pipeline_env: Path, store: ModelStore,
                                                                 saved_model_dir: Path) -> None:
    from flows.rollback import rollback_flow
    from tasks.publish import publish_model
    from tasks.results import LabelMoved

    metrics = {"test_accuracy": 0.97, "test_loss": 0.1, "per_class_accuracy": [0.97] * 10}
    for run in ("first", "second"):
        publish_model(store, saved_model_dir, metrics, {"flow_run_id": run}, "stable")
    state = rollback_flow(return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == LabelMoved(label="stable", previous=2, current=1)
    assert store.labels() == {"stable": 1}
    event = store.history()[-1]
    assert (event["event"], event["flow_run_id"]) == ("rollback", str(state.state_details.flow_run_id))
