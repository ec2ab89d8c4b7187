"""Growing data against a real SeaweedFS and real Prefect: ingest in three formats, validation that
refuses a batch whole, crash safety, the hash split, slices kept out of training, the sliced gate,
and the retrain that happens only when something changed."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from storage.datasets import DatasetStore, example_hashes, split_of
from storage.s3 import StoreError
from storage.settings import DatasetSettings
from tasks.ingest import IngestError, Reference, ingest, mnist_reference
from tests.conftest import REPO, run_mnist


@pytest.fixture(scope="module")
def mnist_raw(mnist_dir: Path):
    from tasks.data import load_mnist_idx

    train, test, _ = load_mnist_idx(mnist_dir)
    return train, test


@pytest.fixture(scope="module")
def reference(mnist_raw) -> Reference:
    return mnist_reference(mnist_raw[0].images, mnist_raw[1].images, mnist_raw[1].labels)


def new_digits(mnist_raw, start: int, stop: int) -> dict[str, np.ndarray]:
    """MNIST training digits moved one pixel right: 28x28 arrays that are not MNIST's own."""
    return {"x": np.roll(mnist_raw[0].images[start:stop], 1, axis=2), "y": mnist_raw[0].labels[start:stop]}


@pytest.fixture()
def datasets(store_env) -> DatasetStore:
    return DatasetStore(DatasetSettings())


def scans(mnist_raw, folder: Path, start: int, count: int = 40) -> Path:
    """``count`` MNIST training digits rendered as another scanner would give them, in 0/ ... 9/."""
    from tasks.synthetic import write_source

    train = mnist_raw[0]
    write_source(train.images[start:start + count], train.labels[start:start + count], folder, seed=start)
    return folder


def bucket_keys(store: DatasetStore) -> list[str]:
    return sorted(item["Key"] for item in store.list_keys(store.key("")))


def test_each_format_is_ingested_split_and_versioned(datasets: DatasetStore, mnist_raw, reference,
                                                      tmp_path: Path) -> None:
    folder = scans(mnist_raw, tmp_path / "folder", 0)
    first = ingest(datasets, folder, "scanner-b", reference)
    assert first.batch["count"] == 40 and first.version["version"] == 1
    assert sum(first.batch["split_counts"].values()) == 40 and first.batch["source"] == "scanner-b"
    assert first.batch["label_histogram"] == np.bincount(mnist_raw[0].labels[:40], minlength=10).tolist()

    other = scans(mnist_raw, tmp_path / "for-csv", 100)
    listing = tmp_path / "for-csv" / "labels.csv"
    with listing.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for path in sorted(other.rglob("*.png")):
            writer.writerow([path.relative_to(other).as_posix(), path.parent.name])
    second = ingest(datasets, listing, "forms", reference)
    assert second.batch["count"] == 40 and second.version["version"] == 2

    arrays = tmp_path / "digits.npz"
    np.savez(arrays, **new_digits(mnist_raw, 200, 230))
    third = ingest(datasets, arrays, "tablet", reference)
    assert third.version["version"] == 3 and third.version["examples"] == 110
    assert set(third.version["sources"]) == {"scanner-b", "forms", "tablet"}
    stored = datasets.read_batch(third.batch["sha256"])
    assert np.array_equal(stored.images, new_digits(mnist_raw, 200, 230)["x"])  # 28x28 arrays are taken as they are
    listed = run_mnist("data", "list", "--json", env={})
    assert listed.returncode == 0 and [row["version"] for row in __import__("json").loads(listed.stdout)] == [1, 2, 3]
    diff = run_mnist("data", "diff", "2", "3")
    assert diff.returncode == 0 and "+30 examples" in diff.stdout and "tablet" in diff.stdout


def test_each_hard_error_refuses_the_batch_and_writes_nothing(datasets: DatasetStore, mnist_raw, reference,
                                                               mnist_dir: Path, tmp_path: Path) -> None:
    good = scans(mnist_raw, tmp_path / "good", 300, 20)
    ingest(datasets, good, "scanner-b", reference)
    before = bucket_keys(datasets)

    unreadable = scans(mnist_raw, tmp_path / "unreadable", 400, 10)
    (unreadable / "3" / "broken.png").write_text("not an image")
    (unreadable / "4" / "empty.png").write_bytes(b"")
    bad_label = scans(mnist_raw, tmp_path / "bad-label", 500, 10)
    (bad_label / "12").mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    listing = tmp_path / "missing.csv"
    listing.write_text("path,label\nnowhere.png,3\n")
    csv_label = scans(mnist_raw, tmp_path / "csv-label", 600, 2)
    (csv_label / "labels.csv").write_text("\n".join(f"{p.relative_to(csv_label)},11"
                                                    for p in sorted(csv_label.rglob("*.png"))))
    npz_label = tmp_path / "label.npz"
    np.savez(npz_label, x=new_digits(mnist_raw, 700, 705)["x"], y=np.array([1, 2, 3, 4, 10]))
    leak = tmp_path / "leak.npz"
    np.savez(leak, x=mnist_raw[1].images[:5], y=mnist_raw[1].labels[:5])
    trained = tmp_path / "trained.npz"
    np.savez(trained, x=mnist_raw[0].images[:5], y=mnist_raw[0].labels[:5])
    cases = [(unreadable, "not a readable image"), (unreadable, "empty file"), (bad_label, "must be named 0-9"),
             (empty, "no examples"), (listing, "does not exist"), (csv_label / "labels.csv", "not a digit 0-9"),
             (npz_label, "not a digit 0-9"), (leak, "MNIST's test set"), (trained, "MNIST's training set"),
             (good, "dataset version 1")]
    for source, expected in cases:
        with pytest.raises(IngestError, match="nothing written") as refused:
            ingest(datasets, source, "again", reference)
        assert expected in str(refused.value), (source, str(refused.value)[:300])
        assert bucket_keys(datasets) == before
    cli = run_mnist("data", "add", str(leak), "--source", "again", env={"MNIST_DATA_DIR": str(mnist_dir)})
    assert cli.returncode == 1 and "MNIST's test set" in cli.stderr and "Traceback" not in cli.stderr
    assert datasets.versions() == [1]


def test_a_batch_killed_mid_ingest_is_never_visible(datasets: DatasetStore, mnist_raw, store_env,
                                                    tmp_path: Path) -> None:
    def run(source: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "tests.slowed_store", "ingest", str(source)], cwd=REPO,
                                stdout=subprocess.PIPE, text=True, env={**os.environ, **store_env})

    for kill_after in range(2):  # after the payload, after the batch manifest
        process = run(scans(mnist_raw, tmp_path / f"killed-{kill_after}", 800 + 100 * kill_after, 20))
        for _ in range(kill_after + 1):
            process.stdout.readline()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        process.stdout.close()
        for digest in datasets.complete_batches():
            datasets.read_batch(digest)  # every visible batch is whole and verifies
        assert datasets.versions() == []  # no version names a batch before the batch is whole
    finished = run(scans(mnist_raw, tmp_path / "finished", 1200, 20))
    assert finished.wait(timeout=120) == 0
    finished.stdout.close()
    assert datasets.versions() == [1] and datasets.latest()["examples"] == 20


def test_concurrent_data_adds_lose_no_batch(datasets: DatasetStore, mnist_raw, store_env, trusted_stable: int,
                                           tmp_path: Path) -> None:
    """Four `mnist data add` processes at once, each with its own digits: version numbers are
    unique, every version builds on its parent, and the last one holds every batch (and the
    quarantine every example the screen held back)."""
    count = 4
    folders = [scans(mnist_raw, tmp_path / f"source-{i}", 2000 + 50 * i, 30) for i in range(count)]
    processes = [subprocess.Popen([sys.executable, "-m", "cli", "data", "add", str(folder), "--source", f"desk-{i}"],
                                  cwd=REPO, env={**os.environ, **store_env}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i, folder in enumerate(folders)]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0] * count, outputs
    versions = [datasets.version(number) for number in datasets.versions()]
    assert [v["version"] for v in versions] == list(range(1, count + 1))
    for version in versions[1:]:
        parent = datasets.version(version["parent"])
        assert set(parent["batches"]) < set(version["batches"]), (parent, version)
    latest = datasets.latest()
    held = sum(datasets.quarantine_manifest(digest)["count"] for digest in datasets.quarantined())
    assert set(latest["sources"]) == {f"desk-{i}" for i in range(count)} and latest["examples"] + held == 30 * count
    assert sorted(latest["batches"]) == datasets.complete_batches()


def test_a_csv_names_only_files_in_its_own_folder_unless_allowed(mnist_raw, tmp_path: Path) -> None:
    from tasks.ingest import read_source

    outside = scans(mnist_raw, tmp_path / "elsewhere", 400, 2)
    folder = tmp_path / "batch"
    scans(mnist_raw, folder, 500, 1)
    inside = next(folder.rglob("*.png")).relative_to(folder).as_posix()
    absolute, climbing = sorted(outside.rglob("*.png"))
    (folder / "link.png").symlink_to(absolute)  # a link inside that points outside is outside too
    listing = folder / "labels.csv"
    listing.write_text(f"path,label\n{inside},{inside[0]}\n{absolute},{absolute.parent.name}\n"
                       f"../elsewhere/{climbing.relative_to(outside).as_posix()},{climbing.parent.name}\n"
                       f"link.png,{absolute.parent.name}\n")
    confined = read_source(listing)
    assert len(confined.images) == 1 and len(confined.errors) == 3
    assert all("is outside the CSV's folder" in error for error in confined.errors)
    assert len(read_source(listing, allow_outside=True).images) == 4


def test_the_hash_split_does_not_move_as_data_grows(datasets: DatasetStore, mnist_raw, reference,
                                                    tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", **new_digits(mnist_raw, 1000, 1200))
    np.savez(tmp_path / "b.npz", **new_digits(mnist_raw, 1200, 1500))
    first = ingest(datasets, tmp_path / "a.npz", "a", reference)
    ingest(datasets, tmp_path / "b.npz", "b", reference)
    batch = datasets.read_batch(first.batch["sha256"])
    assert [split_of(h) for h in example_hashes(batch.images)] == batch.splits.tolist()
    together = new_digits(mnist_raw, 1000, 1500)["x"]
    assert [split_of(h) for h in example_hashes(together)][:200] == batch.splits.tolist()
    shares = np.bincount([split_of(h) for h in example_hashes(together)], minlength=3) / len(together)
    assert 0.7 < shares[0] < 0.9 and 0.04 < shares[1] < 0.17 and 0.04 < shares[2] < 0.17


def plan_of(datasets: DatasetStore, version: dict, prepared_path: Path, cache: Path, weight: int = 3):
    from tasks.data import plan_dataset
    from tasks.shards import read_plan

    path, fetched = plan_dataset(prepared_path, version, datasets, cache, weight, cache / "plan.plan.json")
    return read_plan(path), fetched


def hashes_of_records(files: list[str]) -> set[str]:
    from tasks.shards import read_records

    return {h for name in files for images, _ in read_records(name) for h in example_hashes(images)}


def test_test_slice_examples_never_train(datasets: DatasetStore, mnist_raw, reference, prepared_path: Path,
                                         tmp_path: Path) -> None:
    from tasks.data import slice_batches

    np.savez(tmp_path / "new.npz", **new_digits(mnist_raw, 2000, 2400))
    version = ingest(datasets, tmp_path / "new.npz", "new", reference).version
    plan, _ = plan_of(datasets, version, prepared_path, tmp_path / "cache")
    plan_path = tmp_path / "cache" / "plan.plan.json"
    sliced = [(source, images, labels) for source, images, labels in slice_batches(plan_path)]
    assert {source for source, _, _ in sliced} == {"new"}
    slice_images = np.concatenate([images for _, images, _ in sliced])
    assert len(slice_images) == version["sources"]["new"]["test"] > 0
    assert plan.count("train") == version["sources"]["new"]["train"] and plan.weight == 3
    trained = hashes_of_records(plan.files("train") + plan.files("validation"))
    assert not set(example_hashes(np.round(slice_images[..., 0] * 255))) & trained
    assert len(trained) == version["sources"]["new"]["train"] + version["sources"]["new"]["validation"]


def test_a_second_run_reads_no_batch_from_the_store(datasets: DatasetStore, mnist_raw, reference,
                                                    prepared_path: Path, tmp_path: Path) -> None:
    """The shard cache is keyed by content: once a batch is cached, its payload is never fetched
    again, here shown by deleting every payload from the bucket before the second run."""
    from tasks.shards import CacheError

    np.savez(tmp_path / "a.npz", **new_digits(mnist_raw, 5000, 5300))
    np.savez(tmp_path / "b.npz", **new_digits(mnist_raw, 5300, 5500))
    ingest(datasets, tmp_path / "a.npz", "a", reference)
    version = ingest(datasets, tmp_path / "b.npz", "b", reference).version
    cache = tmp_path / "cache"
    first, fetched = plan_of(datasets, version, prepared_path, cache)
    assert fetched == 2 and first.sources == ["a", "b"]
    for key in bucket_keys(datasets):
        if key.endswith("/examples.bin"):
            datasets.client.delete_object(Bucket=datasets.bucket, Key=key)
    second, fetched = plan_of(datasets, version, prepared_path, cache)
    assert fetched == 0 and second.shards == first.shards
    # a cached file cut after it was written is named, not trained on
    other = version["batches"][1]
    path = cache / "shards" / f"{other}.validation.rec"
    whole = path.read_bytes()
    path.write_bytes(whole[:-10])
    with pytest.raises(CacheError, match=f"cached batch {other[:12]}: {other}.validation.rec holds"):
        plan_of(datasets, version, prepared_path, cache)
    path.write_bytes(whole)
    # a write killed before its index leaves the batch uncached: the next run fetches it whole
    digest = version["batches"][0]
    (cache / "shards" / f"{digest}.json").unlink()
    (cache / "shards" / f"{digest}.train.rec").write_bytes(b"cut short")
    with pytest.raises(StoreError, match=f"batch {digest[:12]}: examples.bin is missing"):
        plan_of(datasets, version, prepared_path, cache)  # the payload is gone from the bucket: fetched, not faked


def test_packs_hold_small_batches_and_a_killed_compaction_shows_nothing(datasets: DatasetStore, mnist_raw,
                                                                         reference, store_env, prepared_path: Path,
                                                                         tmp_path: Path) -> None:
    """Three small batches packed into one compressed object: killed after its payload (before
    its manifest) no pack is visible; finished, a machine with an empty cache reads the version
    in one object, and the examples are the same bytes as the batches' own."""
    for index in range(3):
        np.savez(tmp_path / f"{index}.npz", **new_digits(mnist_raw, 6000 + 40 * index, 6040 + 40 * index))
        version = ingest(datasets, tmp_path / f"{index}.npz", f"desk-{index}", reference).version
    assert datasets.packs() == {}  # 120 examples fill no pack of 50,000: ingest packs only full ones
    killed = subprocess.Popen([sys.executable, "-m", "tests.slowed_store", "compact", "100"], cwd=REPO,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, **store_env})
    first = killed.stdout.readline()  # the pack's payload is written; its manifest is not, yet
    assert first.startswith("put_object ") and "/packs/" in first and first.strip().endswith("pack.bin.z"), first
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    killed.stdout.close()
    assert datasets.packs() == {}, "a pack whose manifest was never written is not visible"
    unpacked, reads = plan_of(datasets, version, prepared_path, tmp_path / "unpacked")
    assert reads == 3
    cli = run_mnist("data", "compact", "--pack-examples", "100", env=store_env)
    assert cli.returncode == 0 and "packed 2 batches (80 examples) as pack" in cli.stdout, cli.stdout + cli.stderr
    [(digest, pack)] = datasets.packs().items()
    assert pack["count"] == 80 and pack["files"]["pack.bin.z"]["size"] < pack["bytes"] / 2  # compressed
    packed, reads = plan_of(datasets, version, prepared_path, tmp_path / "packed")
    assert reads == 2  # the pack, and the third batch that did not fit in it
    for before, after in zip(unpacked.shards, packed.shards):
        for split in ("train", "validation", "test"):
            assert Path(before["files"][split]).read_bytes() == Path(after["files"][split]).read_bytes()
    again = run_mnist("data", "compact", "--pack-examples", "100", env=store_env)
    assert again.returncode == 0 and "no two small batches left outside a pack" in again.stdout


def test_weighted_sampling_gives_new_examples_their_share(tmp_path: Path) -> None:
    """Weight w sees each new training example w times per epoch in expectation, by sampling:
    the share of new examples in the stream is w * new / (mnist + w * new), within 2 points."""
    import tensorflow as tf

    from tasks.shards import DataPlan, ShardCache, decode_batch, new_example_share, training_stream

    rng = np.random.default_rng(0)
    cache = ShardCache(tmp_path)
    shards = []
    for number in range(3):  # three batches: the stream interleaves files
        images = rng.integers(1, 256, (400, 28, 28), dtype=np.uint8)  # never all-zero, unlike the base here
        index = cache.add(f"{number:064x}", "new", images, rng.integers(0, 10, 400, dtype=np.uint8),
                          np.zeros(400, np.uint8))
        shards.append({**index, "files": {s: str(p) for s, p in cache.files(index["sha256"]).items()}})
    base = tmp_path / "base.npz"  # MNIST's place, all-zero digits here
    np.savez(base, x_train=np.zeros((3000, 28, 28), np.uint8), y_train=np.zeros(3000, np.uint8))
    plan = DataPlan(base, 4, 1, shards)
    expected = new_example_share(3000, 1200, 4)
    assert abs(expected - 4800 / 7800) < 1e-9
    seen = np.concatenate([images.numpy().reshape(len(images), -1).max(axis=1) > 0 for images, _ in
                           training_stream(plan, seed=1, shuffle_buffer=512).batch(1000).map(decode_batch).take(20)])
    assert abs(seen.mean() - expected) < 0.02, (seen.mean(), expected)
    assert tf.data.experimental.cardinality(training_stream(plan, 1)) < 0  # endless


def test_sliced_gate_rejects_a_candidate_worse_on_a_new_slice_though_better_on_mnist() -> None:
    from tasks.gate import accuracy_gate, champion_checks, judge, slice_checks
    from tasks.results import Evaluation, SliceScores, StableScores

    def sliced_as(accuracy: float, examples: int) -> SliceScores:  # the two fields the slice checks read
        return SliceScores.model_construct(accuracy=accuracy, num_examples=examples)

    stable = StableScores.model_construct(version=4, test_accuracy=0.991, per_class_accuracy=[0.99] * 10,
                                          misclassified=list(range(90)), slices={"scanner-b": sliced_as(0.97, 300)})
    candidate = Evaluation.model_construct(test_accuracy=0.994, per_class_accuracy=[0.994] * 10,
                                           misclassified=list(range(60)), num_examples=10000,
                                           slices={"scanner-b": sliced_as(0.93, 300), "tiny": sliced_as(0.5, 12)})
    sliced, notes = slice_checks(candidate, stable, threshold=0.9, margin=0.02, min_size=100)
    verdict = judge([accuracy_gate(candidate, 0.99), *champion_checks(candidate, stable, 0.001, 0.01), *sliced])
    assert not verdict.passed
    assert re.search(r"slice scanner-b not worse than stable v4 .* failed: 0\.9300 < 0\.9500", verdict.summary)
    assert notes == ["slice tiny: 12 test examples < 100, reported, not gated"]


# smoke models differ run to run more than any champion margin allows; these tests are about data
LOOSE_CHAMPION_CHECKS = {"accuracy_margin": 1.0, "class_margin": 1.0, "moved_margin": 1.0, "shortcut_follow": 0.0}


def test_retrain_skips_when_nothing_changed_and_runs_when_data_did(prefect_api, pipeline_env: Path,
                                                                    store_env, datasets: DatasetStore,
                                                                    mnist_raw, reference, tmp_path: Path) -> None:
    from flows.params import TrainingParams
    from flows.training import training_flow
    from storage.models import ModelStore
    from storage.settings import StoreSettings

    params = TrainingParams(preset="smoke", threshold=0.5, slice_threshold=0.0, min_slice_size=1)
    first = training_flow(params, return_state=True)
    assert first.is_completed() and first.result().published.version == 1
    again = training_flow(params, return_state=True)
    assert again.is_completed() and again.message.startswith("skipped: nothing changed since version 1 (stable): "
                                                              "the same data fingerprint, code version and training")
    assert "force=true retrains anyway" in again.message
    assert again.result().skipped == again.message and ModelStore(StoreSettings()).complete_versions() == [1]
    np.savez(tmp_path / "new.npz", **new_digits(mnist_raw, 3000, 3300))
    ingest(datasets, tmp_path / "new.npz", "tablet", reference)
    too_few = training_flow(params.model_copy(update={"min_new_examples": 1000}), return_state=True)
    assert too_few.message.startswith("skipped: 300 new examples since version 1, fewer than 1000 (min_new_examples)")
    retrained = training_flow(params.model_copy(update={**LOOSE_CHAMPION_CHECKS,
                                                         "slice_margin": 1.0}), return_state=True)
    assert retrained.is_completed(), retrained.message
    result = retrained.result()
    assert result.published.version == 2 and set(result.slices) == {"tablet"}
    manifest = ModelStore(StoreSettings()).manifest(2)
    assert manifest["dataset"]["version"] == 1 and manifest["dataset"]["sources"]["tablet"]["test"] > 0
    forced = training_flow(params.model_copy(update={**LOOSE_CHAMPION_CHECKS, "slice_margin": 1.0}),
                           force=True, return_state=True)  # the run form's own checkbox
    assert forced.is_completed() and forced.result().published.version == 3
    # forced on what stable was trained on: a new seed, or, with that very seed asked for, a skip
    seeds = [ModelStore(StoreSettings()).manifest(version)["config"]["seed"] for version in (2, 3)]
    assert seeds[0] != seeds[1], seeds
    repeat = training_flow(params.model_copy(update={"seed": seeds[1]}), force=True, return_state=True)
    assert repeat.message == (f"skipped: forced, but seed {seeds[1]} on the same data, code and recipe would "
                              "reproduce version 3 (stable); give another --seed, or none for a new one")
    assert ModelStore(StoreSettings()).complete_versions() == [1, 2, 3]
    overview = latest_artifact("mnist-registry")
    assert "| version | labels | dataset version | MNIST test | tablet |" in overview
    assert "`stable` -> version 3" in overview and "data:image/png;base64," in overview


def latest_artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                           sort=ArtifactSort.CREATED_DESC, limit=1)
    return str(artifact.data)


def test_ingest_flow_reports_the_batch(prefect_api, pipeline_env: Path, store_env, mnist_dir: Path, mnist_raw,
                                       monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from flows.ingest import ingest_flow

    monkeypatch.setenv("MNIST_DATA_DIR", str(mnist_dir))
    folder = scans(mnist_raw, tmp_path / "flow", 4000, 30)
    state = ingest_flow(str(folder), "scanner-c", return_state=True)
    assert state.is_completed(), state.message
    assert state.result().dataset_version == 1 and state.result().count == 30
    report = latest_artifact("mnist-ingest")
    assert "Ingested 30 digits from `scanner-c`" in report and "data:image/png;base64," in report
    refused = ingest_flow(str(folder), "scanner-c", return_state=True)
    assert refused.is_failed() and "exact duplicate" in refused.message


def test_slices_that_outgrow_one_process_are_scored_on_dask(prefect_api, pipeline_env: Path, store_env,
                                                            datasets: DatasetStore, mnist_raw, reference,
                                                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Past MNIST_DASK_SLICE_EXAMPLES test-slice examples the run scores its slices on a local Dask
    cluster, a group of cached shards per worker; the scores are those of scoring them in process."""
    from flows.params import TrainingParams
    from flows.training import training_flow
    from tasks.model import load_saved_model
    from tasks.scoring import slice_scores
    from tests.flows.test_candidates import child_flow_names

    for index in range(3):  # three batches: three test shards across two workers
        np.savez(tmp_path / f"{index}.npz", **new_digits(mnist_raw, 7000 + 200 * index, 7200 + 200 * index))
        ingest(datasets, tmp_path / f"{index}.npz", ("tablet", "scanner", "tablet")[index], reference)
    monkeypatch.setenv("MNIST_DASK_SLICE_EXAMPLES", "1")
    monkeypatch.setenv("MNIST_CACHE_DIR", str(tmp_path / "cache"))  # this run's plan, alone in it
    state = training_flow(TrainingParams(preset="smoke", threshold=0.0, slice_threshold=0.0, publish=False,
                                         dataset_version=3), return_state=True)
    assert state.is_completed(), state.message
    assert child_flow_names(state.state_details.flow_run_id) == ["mnist-slice-scoring"]
    result = state.result()
    run_dir = Path(result.run_dir)
    model = load_saved_model(str(run_dir / "model.keras"))
    [plan] = (tmp_path / "cache").glob("mnist-*.plan.json")
    local = slice_scores(lambda images: model.predict(images, batch_size=1024, verbose=0), plan)
    assert set(local) == {"scanner", "tablet"} and result.slices == {s: v.accuracy for s, v in local.items()}
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["slices"] == {source: scores.model_dump() for source, scores in local.items()}
