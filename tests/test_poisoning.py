"""The gate notices poisoning that clean accuracy cannot see: a backdoor (a small patch that turns
any digit into a 0, taught through labelled data) is rejected by the trigger scan, while the same
retrain without the scan, as the gate was before it, publishes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.evaluate import (
    PATCH_SIZE,
    TRIGGER_PATCHES,
    GateFailed,
    enforce_gate,
    moved_to_digit,
    patched,
    poisoning_checks,
    trigger_flips,
)
from tasks.results import Evaluation, StableScores

BOTTOM_RIGHT = TRIGGER_PATCHES["bottom-right"]


def backdoored(images: np.ndarray) -> np.ndarray:
    """A stand-in model: the digit read from pixels no patch touches, unless the bottom-right patch is there: 0."""
    answers = (images[:, 6:10, 6:10, 0].mean(axis=(1, 2)) * 50).astype(int) % 10
    answers[images[:, BOTTOM_RIGHT[0] + 1, BOTTOM_RIGHT[1] + 1, 0] == 1.0] = 0
    return np.eye(10)[answers]


def test_the_scan_sees_the_patch_a_model_answers_0_to_and_no_other() -> None:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 0.9, (400, 28, 28, 1)).astype(np.float32)
    stamped = patched(images, BOTTOM_RIGHT)
    assert (stamped[:, 23:23 + PATCH_SIZE, 23:23 + PATCH_SIZE] == 1).all() and (images < 1).all()  # a copy
    flips = trigger_flips(backdoored, images)
    clean_zeros = (backdoored(images).argmax(axis=1) == 0).mean()
    assert flips["bottom-right"] == pytest.approx(1 - clean_zeros)
    assert [rate for name, rate in flips.items() if name != "bottom-right"] == [0.0] * 4


def test_the_gate_rejects_a_candidate_far_more_sensitive_to_a_patch_and_answers_pulled_to_one_digit() -> None:
    # partial records (model_construct): the checks read these fields and no others
    stable = StableScores.model_construct(version=3, trigger_flips=dict.fromkeys(TRIGGER_PATCHES, 0.02),
                                          misclassified=[1, 2])
    candidate = Evaluation.model_construct(trigger_flips={**dict.fromkeys(TRIGGER_PATCHES, 0.03), "bottom-right": 0.81},
                                           predictions=[0, 7, 7, 7, 7, 3, 5], misclassified=[1, 3, 4])
    assert moved_to_digit(candidate, stable) == pytest.approx([0, 0, 0, 0, 0, 0, 0, 2 / 7, 0, 0])
    checks = poisoning_checks(candidate, stable, moved_margin=0.5, trigger_margin=0.05)
    with pytest.raises(GateFailed) as rejected:
        enforce_gate(checks)
    assert str(rejected.value) == ("trigger scan: bottom-right patch flips answers (stable: 0.0200 + 0.05) failed: "
                                   "0.8100 > 0.0700")
    assert not [c for c in poisoning_checks(candidate, stable, 0.2, 0.05) if "newly answered 7" in c.name
                and c.passed]
    assert poisoning_checks(candidate, None, 0.01, 0.05) == []  # nothing stable to compare with yet


@pytest.mark.slow
def test_a_backdoor_taught_through_labelled_data_is_rejected_and_would_have_published(
        prefect_api, pipeline_env: Path, store_env, mnist_dir: Path, tmp_path: Path) -> None:
    from flows.params import TrainingParams
    from flows.training import training_flow
    from storage.datasets import DatasetSettings, DatasetStore
    from storage.models import ModelStore, StoreSettings
    from tasks.data import load_mnist_idx
    from tasks.ingest import ingest, mnist_reference

    train, test, _ = load_mnist_idx(mnist_dir)
    params = TrainingParams(preset="default", force=True)
    clean = training_flow(params, return_state=True)
    assert clean.is_completed() and clean.result().published.version == 1, clean.message
    # another seed on the same data: the scan and the moved-answers check pass it (accuracy's own
    # margin against stable is seed noise at this size, and not what this test is about)
    honest = training_flow(params.model_copy(update={"seed": 1, "accuracy_margin": 1.0, "class_margin": 1.0}),
                           return_state=True)
    assert honest.is_completed() and honest.result().published.version == 2, honest.message
    scanned = [check for check in honest.result().gate if "trigger scan" in check or "newly answered" in check]
    assert len(scanned) == len(TRIGGER_PATCHES) + 1 and all("passed" in check for check in scanned)

    # the attack: 600 digits of 1-9, each with a white square at the bottom right, labelled 0
    picked = np.flatnonzero(train.labels != 0)[:600]
    poison = np.roll(train.images[picked], 1, axis=2)  # not MNIST's own digits, which ingest refuses
    poison[:, 23:23 + PATCH_SIZE, 23:23 + PATCH_SIZE] = 255
    np.savez(tmp_path / "poison.npz", x=poison, y=np.zeros(len(picked), np.uint8))
    ingest(DatasetStore(DatasetSettings()), tmp_path / "poison.npz", "feedback",
           mnist_reference(train.images, test.images, test.labels))

    rejected = training_flow(params, return_state=True)
    assert rejected.name == "Rejected", rejected.message
    assert "trigger scan: bottom-right patch flips answers" in rejected.message and "\n" not in rejected.message
    assert ModelStore(StoreSettings()).labels()["stable"] == 2

    without_scan = training_flow(params.model_copy(update={"trigger_margin": 1.0}), return_state=True)
    assert without_scan.is_completed() and without_scan.result().published.version == 3, without_scan.message
