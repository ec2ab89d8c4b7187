"""The data screen holds labels the trusted models contradict, whatever the trigger, and lets an
honest source through: `mnist data add` as an operator runs it, against a real published model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from storage.datasets import DatasetStore
from storage.settings import DatasetSettings
from tests.conftest import run_mnist
from tests.gateway_cases import digits, upstream  # noqa: F401  fixtures, used by name
from tests.tasks.test_datasets import mnist_raw  # noqa: F401  (the module-scoped MNIST arrays)

COUNT = 200


def others(mnist_raw, target: int, start: int, count: int = COUNT) -> np.ndarray:
    """MNIST training digits of every class but ``target``, shifted one pixel (not MNIST's own)."""
    train = mnist_raw[0]
    picked = np.flatnonzero(train.labels != target)[start:start + count]
    return np.roll(train.images[picked], 1, axis=2)


def with_patch(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = int(rng.integers(2, 6))
    row, column = rng.integers(0, 28 - size, 2)
    stamped = images.copy()
    stamped[:, row:row + size, column:column + size] = 255
    return stamped


def with_blend(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = rng.uniform(0, 255, (28, 28))
    return ((1 - 0.15) * images + 0.15 * noise).astype(np.uint8)


def with_pixels(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    stamped = images.copy()
    rows, columns = rng.integers(0, 28, 6), rng.integers(0, 28, 6)
    stamped[:, rows, columns] = 255
    return stamped


def without_trigger(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return images  # a plain label flip


def add(path: Path, source: str, env: dict[str, str]):
    return run_mnist("data", "add", str(path), "--source", source, env=env)


def quarantine(env: dict[str, str]) -> list[dict]:
    listed = run_mnist("data", "quarantine", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


@pytest.mark.parametrize("trigger", [with_patch, with_blend, with_pixels, without_trigger])
def test_relabelled_digits_wait_in_quarantine_whatever_the_trigger(trigger, mnist_raw, mnist_dir: Path, store_env,
                                                                   trusted_stable: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(abs(hash(trigger.__name__)) % 1000)
    target = int(rng.integers(0, 10))
    np.savez(tmp_path / "poison.npz", x=trigger(others(mnist_raw, target, 0), rng), y=np.full(COUNT, target))
    env = {"MNIST_DATA_DIR": str(mnist_dir)}
    added = add(tmp_path / "poison.npz", "newcomer", env)
    assert added.returncode == 1 and "nothing added" in added.stderr and "Traceback" not in added.stderr, added.stderr
    assert f"labelled {target}" in added.stderr and len(added.stderr.strip().splitlines()) == 1
    assert DatasetStore(DatasetSettings()).versions() == []  # nothing trains
    [held] = quarantine(env)
    assert held["source"] == "newcomer" and held["pending"] == COUNT and held["held"]
    # the operator decides per source: rejected, they are gone from the list and never train
    rejected = run_mnist("data", "reject", "--source", "newcomer", env=env)
    assert rejected.returncode == 0 and f"rejected {COUNT}" in rejected.stdout
    assert quarantine(env) == []


def test_an_honest_source_trains_and_what_is_flagged_is_listed_with_its_reason(
        mnist_raw, mnist_dir: Path, store_env, trusted_stable: int, tmp_path: Path) -> None:
    train = mnist_raw[0]
    honest = np.roll(train.images[3000:3000 + 500], 1, axis=1)
    labels = train.labels[3000:3000 + 500].copy()
    labels[:10] = (labels[:10] + 3) % 10  # ten wrong labels in an honest batch: held one by one
    np.savez(tmp_path / "honest.npz", x=honest, y=labels)
    env = {"MNIST_DATA_DIR": str(mnist_dir)}
    added = add(tmp_path / "honest.npz", "scanner-c", env)
    assert added.returncode == 0, added.stderr
    datasets = DatasetStore(DatasetSettings())
    [held] = quarantine(env)
    assert not held["held"] and 8 <= held["pending"] <= 15  # the wrong labels (a quick model misses a few),
    # and at most a few honest ones
    assert datasets.latest()["examples"] == 500 - held["pending"]
    shown = run_mnist("data", "quarantine", held["id"], env=env)
    assert shown.returncode == 0 and "not the given" in shown.stdout and "stable v" in shown.stdout
    accepted = run_mnist("data", "accept", held["id"], "--examples", "0", env=env)
    assert accepted.returncode == 0 and "accepted 1 examples" in accepted.stdout, accepted.stdout + accepted.stderr
    assert datasets.latest()["examples"] == 500 - held["pending"] + 1
    [still] = quarantine(env)
    assert still["pending"] == held["pending"] - 1
    again = run_mnist("data", "accept", held["id"], "--examples", "0", env=env)
    assert again.returncode == 1 and "not pending" in again.stderr


def test_without_a_trusted_model_everything_waits_until_one_screens_it(
        mnist_raw, mnist_dir: Path, store_env, saved_model_dir: Path, tmp_path: Path) -> None:
    from storage.models import ModelStore
    from storage.settings import StoreSettings

    train = mnist_raw[0]
    np.savez(tmp_path / "early.npz", x=np.roll(train.images[6000:6100], 1, axis=1), y=train.labels[6000:6100])
    env = {"MNIST_DATA_DIR": str(mnist_dir)}
    added = add(tmp_path / "early.npz", "early", env)
    assert added.returncode == 1 and "no trusted model" in added.stderr
    models = ModelStore(StoreSettings())
    models.set_label("stable", models.publish(saved_model_dir, {"dataset": None, "metrics": {}})["version"])
    screened = run_mnist("data", "screen", env=env)
    assert screened.returncode == 0, screened.stderr
    datasets = DatasetStore(DatasetSettings())
    passed = datasets.latest()["examples"]
    assert passed >= 95 and f"{passed} examples pass the screen" in screened.stdout


def test_colluding_tokens_that_agree_cannot_admit_a_label_the_screen_contradicts(
        store_env, upstream, digits: np.ndarray, mnist_dir: Path, trusted_stable: int) -> None:
    """Eight untrusted tokens in four agreeing pairs send their own triggered digits through the
    gateway and label them all one target: the policy takes every one (each caller is a quarter of
    the batch, within the share), the screen holds every one with the callers it rests on, nothing
    trains, and the operator rejects them by caller."""
    import httpx

    from mnist_client.client import Target, predict_call
    from serving.gateway.callers import Caller, Credential
    from tests.gateway_cases import LABELLER, bearer, start_gateway, wait_for

    _, address, _ = upstream
    tokens = [Credential(f"colluding-token-{i:02d}-5e1c2d3b4a".encode(), Caller(f"app-{i}", trusted=False))
              for i in range(8)]
    target = 3  # none of MNIST's first 16 test digits is a 3
    triggered = np.roll(digits[:16], 2, axis=2).copy()
    triggered[:, 20:23, 4:7] = 1.0  # a patch no check knows of
    gateway = start_gateway(address, credentials=(LABELLER, *tokens))
    url = f"http://127.0.0.1:{gateway.rest.port}/v1/models/mnist/feedback"
    try:
        ids = [predict_call(triggered[i:i + 1], Target(f"127.0.0.1:{gateway.port}")).request_id for i in range(16)]
        wait_for(lambda: gateway.logger.written_records == 16)
        replies = [httpx.post(url, json={"request_id": request_id, "label": target}, headers=bearer(who))
                   for number, request_id in enumerate(ids) for who in tokens[2 * (number % 4):2 * (number % 4) + 2]]
    finally:
        gateway.stop()
    assert [reply.status_code for reply in replies] == [200] * 32
    env = {"MNIST_DATA_DIR": str(mnist_dir)}
    added = run_mnist("data", "add", "--from-feedback", env=env)
    assert added.returncode == 0 and "16 held by the data screen" in added.stdout, added.stdout + added.stderr
    assert DatasetStore(DatasetSettings()).versions() == []  # not one trained
    [held] = quarantine(env)
    assert held["source"] == "feedback" and held["pending"] == 16
    rejected = run_mnist("data", "reject", "--caller", "app-0", env=env)  # app-0 labelled 4 of them
    assert rejected.returncode == 0 and "rejected 4" in rejected.stdout, rejected.stdout + rejected.stderr
    assert quarantine(env)[0]["pending"] == 12
