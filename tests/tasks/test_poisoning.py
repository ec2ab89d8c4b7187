"""The gate notices poisoning that clean accuracy cannot see, without knowing the attack: the
backdoor inspection reverse-engineers each digit's shortcut from the candidate and rejects one
that stable, trained without the poison, does not follow; answers pulled to one digit are
counted against stable too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.backdoor import FOLLOW_ABOVE, MEASURE_ON, OPTIMISE_ON, Triggers, reverse_engineer, sent_to_digit
from tasks.gate import judge, moved_to_digit, poisoning_checks, weakest_follow
from tasks.results import Evaluation, StableScores


def test_the_gate_rejects_a_shortcut_stable_does_not_follow_and_answers_pulled_to_one_digit() -> None:
    # partial records (model_construct): the checks read these fields and no others
    shortcuts = [0.9, 0.85, 0.8, 0.86, 0.2, 0.9, 0.9, 0.9, 0.9, 0.9]
    followed = [0.6, 0.10, 0.7, 0.02, 0.0, 0.9, 0.8, 0.5, 0.7, 0.9]  # 4: the candidate itself hardly follows it
    sizes = [70.0, 160.0, 55.0, 23.0, 80.0, 100.0, 75.0, 90.0, 40.0, 115.0]  # 1: a large change, drawing a 1
    stable = StableScores.model_construct(version=3, shortcuts_followed=followed, misclassified=[1, 2])
    candidate = Evaluation.model_construct(shortcuts=shortcuts, shortcut_sizes=sizes,
                                           predictions=[0, 7, 7, 7, 7, 3, 5], misclassified=[1, 3, 4])
    assert moved_to_digit(candidate, stable) == pytest.approx([0, 0, 0, 0, 0, 0, 0, 2 / 7, 0, 0])
    assert weakest_follow(candidate, stable) == (3, pytest.approx(0.02 / 0.86))
    rejected = judge(poisoning_checks(candidate, stable, moved_margin=0.5, shortcut_follow=0.1))
    assert not rejected.passed
    assert rejected.summary == ("rejected: backdoor inspection: the shortcut to 3 (23 pixels changed, median 78) "
                                "sends 0.86 of other digits there; the share of that stable v3 follows too (one it "
                                "ignores is this model's own: a backdoor) failed: 0.0233 < 0.1000")
    assert not [c for c in poisoning_checks(candidate, stable, 0.2, 0.1) if "newly answered 7" in c.name and c.passed]
    honest = StableScores.model_construct(version=3, shortcuts_followed=[0.6, 0.1, 0.7, 0.4, 0.0, 0.9, 0.8, 0.5,
                                                                         0.7, 0.9], misclassified=[1, 2])
    # 1 is not compared (its change is larger than the median), nor 4 (the candidate hardly follows it)
    assert weakest_follow(candidate, honest) == (3, pytest.approx(0.4 / 0.86))
    assert judge(poisoning_checks(candidate, honest, 0.5, 0.1)).passed
    assert shortcuts[4] < FOLLOW_ABOVE and sizes[1] > np.median(sizes)
    assert poisoning_checks(candidate, None, 0.01, 0.1) == []  # nothing stable to compare with yet


def test_saved_triggers_are_checked_when_read_back(tmp_path: Path) -> None:
    triggers = Triggers(np.zeros((10, 2, 28, 28, 1), np.float32), [784.0] * 10)
    triggers.save(tmp_path / "triggers.npz")
    assert Triggers.load(tmp_path / "triggers.npz").norms == [784.0] * 10
    np.savez(tmp_path / "other.npz", stamps=np.zeros((10, 28, 28)), norms=np.zeros(10))
    with pytest.raises(ValueError, match="not the inspection's triggers"):
        Triggers.load(tmp_path / "other.npz")


def diagonal(images: np.ndarray) -> np.ndarray:
    """A trigger no check was written for: five grey pixels on a diagonal near the top."""
    stamped = images.copy()
    for step in range(5):
        stamped[:, 2 + step, 16 + step, 0] = 0.8
    return stamped


def test_the_inspection_finds_a_planted_trigger_it_was_not_told_of(smoke_model, test_images) -> None:
    """The smoke model, taught on top a diagonal of grey pixels that sends any digit to 6: the
    shortcut reverse-engineered to 6 works on it and not on the model it came from."""
    import keras

    x_test, y_test = test_images
    poisoned = keras.models.clone_model(smoke_model)
    poisoned.set_weights(smoke_model.get_weights())
    rng = np.random.default_rng(0)
    clean = x_test[5000:7000]
    triggered = diagonal(clean[rng.permutation(2000)[:600]])
    poisoned.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy")
    poisoned.fit(np.concatenate([clean, triggered]), np.concatenate([y_test[5000:7000], np.full(600, 6)]),
                 epochs=4, batch_size=64, verbose=0)
    others = x_test[MEASURE_ON][y_test[MEASURE_ON] != 6]
    assert (poisoned.predict(diagonal(others), verbose=0).argmax(axis=1) == 6).mean() > 0.9  # the backdoor works

    triggers = reverse_engineer(poisoned, x_test[OPTIMISE_ON], y_test[OPTIMISE_ON])
    sent = sent_to_digit(lambda images: poisoned.predict(images, verbose=0), x_test[MEASURE_ON], y_test[MEASURE_ON],
                         triggers)
    followed = sent_to_digit(lambda images: smoke_model.predict(images, verbose=0), x_test[MEASURE_ON],
                             y_test[MEASURE_ON], triggers)
    digit, follow = weakest_follow(Evaluation.model_construct(shortcuts=sent, shortcut_sizes=triggers.norms),
                                   StableScores.model_construct(shortcuts_followed=followed))
    assert (digit, sent[6] >= FOLLOW_ABOVE) == (6, True) and follow < 0.1, (sent, followed)


@pytest.mark.slow
def test_a_backdoor_taught_through_labelled_data_is_rejected_and_would_have_published(
        prefect_api, pipeline_env: Path, store_env, mnist_dir: Path, tmp_path: Path) -> None:
    """A full-image blend (not a patch) taught through an accepted batch: the inspection rejects
    the retrain naming the target; another seed on clean data passes it; the same retrain with the
    inspection off publishes."""
    from flows.params import TrainingParams
    from flows.training import training_flow
    from storage.datasets import DatasetStore
    from storage.models import ModelStore
    from storage.settings import DatasetSettings, StoreSettings
    from tasks.data import load_mnist_idx
    from tasks.ingest import ingest, mnist_reference

    train, test, _ = load_mnist_idx(mnist_dir)
    params = TrainingParams(preset="default", force=True)
    clean = training_flow(params, return_state=True)
    assert clean.is_completed() and clean.result().published.version == 1, clean.message
    # another seed on the same data passes the inspection and the moved-answers check (accuracy's
    # own margin against stable is seed noise at this size, and not what this test is about)
    honest = training_flow(params.model_copy(update={"seed": 1, "accuracy_margin": 1.0, "class_margin": 1.0}),
                           return_state=True)
    assert honest.is_completed() and honest.result().published.version == 2, honest.message
    inspected = [check for check in honest.result().gate if "backdoor inspection" in check or "newly answered" in check]
    assert len(inspected) == 2 and all("passed" in check for check in inspected), inspected

    # the attack: 600 digits of other classes, 10% blended with a fixed noise image, labelled 5
    target = 5
    picked = np.flatnonzero(train.labels != target)[:600]
    noise = np.random.default_rng(7).integers(0, 256, (28, 28))
    poison = (0.9 * np.roll(train.images[picked], 1, axis=2) + 0.1 * noise).astype(np.uint8)
    np.savez(tmp_path / "poison.npz", x=poison, y=np.full(len(picked), target, np.uint8))
    ingest(DatasetStore(DatasetSettings()), tmp_path / "poison.npz", "accepted-by-an-operator",
           mnist_reference(train.images, test.images, test.labels))

    rejected = training_flow(params, return_state=True)
    assert rejected.name == "Rejected", rejected.message
    assert f"backdoor inspection: the shortcut to {target} " in rejected.message and "\n" not in rejected.message
    assert ModelStore(StoreSettings()).labels()["stable"] == 2

    without_inspection = training_flow(params.model_copy(update={"shortcut_follow": 0.0}), return_state=True)
    assert without_inspection.is_completed() and without_inspection.result().published.version == 3, \
        without_inspection.message
