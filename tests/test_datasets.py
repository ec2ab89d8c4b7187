"""Growing data against a real SeaweedFS and real Prefect: ingest in three formats, validation that
refuses a batch whole, crash safety, the hash split, slices kept out of training, the sliced gate,
and the retrain that happens only when something changed."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from storage.datasets import DatasetSettings, DatasetStore, example_hashes, split_of
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
    assert first["batch"]["count"] == 40 and first["version"]["version"] == 1
    assert sum(first["batch"]["split_counts"].values()) == 40 and first["batch"]["source"] == "scanner-b"
    assert first["batch"]["label_histogram"] == np.bincount(mnist_raw[0].labels[:40], minlength=10).tolist()

    other = scans(mnist_raw, tmp_path / "for-csv", 100)
    listing = tmp_path / "for-csv" / "labels.csv"
    with listing.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for path in sorted(other.rglob("*.png")):
            writer.writerow([path.relative_to(other).as_posix(), path.parent.name])
    second = ingest(datasets, listing, "forms", reference)
    assert second["batch"]["count"] == 40 and second["version"]["version"] == 2

    arrays = tmp_path / "digits.npz"
    np.savez(arrays, **new_digits(mnist_raw, 200, 230))
    third = ingest(datasets, arrays, "tablet", reference)
    assert third["version"]["version"] == 3 and third["version"]["examples"] == 110
    assert set(third["version"]["sources"]) == {"scanner-b", "forms", "tablet"}
    stored = datasets.read_batch(third["batch"]["sha256"])
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


def test_concurrent_data_adds_lose_no_batch(datasets: DatasetStore, mnist_raw, store_env, tmp_path: Path) -> None:
    """Four `mnist data add` processes at once, each with its own digits: version numbers are
    unique, every version builds on its parent, and the last one holds every batch."""
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
    assert set(latest["sources"]) == {f"desk-{i}" for i in range(count)} and latest["examples"] == 30 * count
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
    batch = datasets.read_batch(first["batch"]["sha256"])
    assert [split_of(h) for h in example_hashes(batch.images)] == batch.splits.tolist()
    together = new_digits(mnist_raw, 1000, 1500)["x"]
    assert [split_of(h) for h in example_hashes(together)][:200] == batch.splits.tolist()
    shares = np.bincount([split_of(h) for h in example_hashes(together)], minlength=3) / len(together)
    assert 0.7 < shares[0] < 0.9 and 0.04 < shares[1] < 0.17 and 0.04 < shares[2] < 0.17


def test_test_slice_examples_never_train(datasets: DatasetStore, mnist_raw, reference, prepared_path: Path,
                                         tmp_path: Path) -> None:
    from tasks.data import add_new_data, load_prepared, load_slices

    np.savez(tmp_path / "new.npz", **new_digits(mnist_raw, 2000, 2400))
    version = ingest(datasets, tmp_path / "new.npz", "new", reference)["version"]
    combined = tmp_path / "combined.npz"
    add_new_data(prepared_path, version, datasets.examples(version), 3, combined)
    data, slices = load_prepared(combined), load_slices(combined)
    slice_images, _ = slices["new"]
    assert len(slice_images) == version["sources"]["new"]["test"] > 0
    as_bytes = lambda images: set(example_hashes(np.round(images[..., 0] * 255)))  # noqa: E731
    assert not as_bytes(slice_images) & (as_bytes(data.x_train) | as_bytes(data.x_val))
    base = load_prepared(prepared_path)
    assert len(data.y_train) == len(base.y_train) + 3 * version["sources"]["new"]["train"]


def test_sliced_gate_rejects_a_candidate_worse_on_a_new_slice_though_better_on_mnist() -> None:
    from tasks.evaluate import GateFailed, accuracy_gate, champion_checks, enforce_gate, slice_checks

    stable = {"version": 4, "test_accuracy": 0.991, "per_class_accuracy": [0.99] * 10,
              "slices": {"scanner-b": {"accuracy": 0.97, "num_examples": 300}}}
    candidate = {"test_accuracy": 0.994, "per_class_accuracy": [0.994] * 10,
                 "slices": {"scanner-b": {"accuracy": 0.93, "num_examples": 300},
                            "tiny": {"accuracy": 0.5, "num_examples": 12}}}
    sliced, notes = slice_checks(candidate, stable, threshold=0.9, margin=0.02, min_size=100)
    with pytest.raises(GateFailed, match=r"slice scanner-b not worse than stable v4 .* failed: 0\.9300 < 0\.9500"):
        enforce_gate([accuracy_gate(candidate, 0.99), *champion_checks(candidate, stable, 0.001, 0.01), *sliced])
    assert notes == ["slice tiny: 12 test examples < 100, reported, not gated"]


# smoke models differ run to run more than any champion margin allows; these tests are about data
LOOSE_CHAMPION_CHECKS = {"accuracy_margin": 1.0, "class_margin": 1.0, "moved_margin": 1.0, "trigger_margin": 1.0}


def test_retrain_skips_when_nothing_changed_and_runs_when_data_did(prefect_api, pipeline_env: Path,
                                                                    store_env, datasets: DatasetStore,
                                                                    mnist_raw, reference, tmp_path: Path) -> None:
    from flows.params import TrainingParams
    from flows.training import training_flow
    from storage.models import ModelStore, StoreSettings

    params = TrainingParams(preset="smoke", threshold=0.5, slice_threshold=0.0, min_slice_size=1)
    first = training_flow(params, return_state=True)
    assert first.is_completed() and first.result()["published"]["version"] == 1
    again = training_flow(params, return_state=True)
    assert again.is_completed() and again.message.startswith("skipped: nothing changed since version 1 (stable): "
                                                              "the same data fingerprint, code version and training")
    assert "force=true retrains anyway" in again.message
    assert again.result()["skipped"] == again.message and ModelStore(StoreSettings()).complete_versions() == [1]
    np.savez(tmp_path / "new.npz", **new_digits(mnist_raw, 3000, 3300))
    ingest(datasets, tmp_path / "new.npz", "tablet", reference)
    too_few = training_flow(params.model_copy(update={"min_new_examples": 1000}), return_state=True)
    assert too_few.message.startswith("skipped: 300 new examples since version 1, fewer than 1000 (min_new_examples)")
    retrained = training_flow(params.model_copy(update={**LOOSE_CHAMPION_CHECKS,
                                                         "slice_margin": 1.0}), return_state=True)
    assert retrained.is_completed(), retrained.message
    result = retrained.result()
    assert result["published"]["version"] == 2 and set(result["slices"]) == {"tablet"}
    manifest = ModelStore(StoreSettings()).manifest(2)
    assert manifest["dataset"]["version"] == 1 and manifest["dataset"]["sources"]["tablet"]["test"] > 0
    forced = training_flow(params.model_copy(update={**LOOSE_CHAMPION_CHECKS, "slice_margin": 1.0}),
                           force=True, return_state=True)  # the run form's own checkbox
    assert forced.is_completed() and "skipped" not in forced.result()
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
    assert state.result()["dataset_version"] == 1 and state.result()["count"] == 30
    report = latest_artifact("mnist-ingest")
    assert "Ingested 30 digits from `scanner-c`" in report and "data:image/png;base64," in report
    refused = ingest_flow(str(folder), "scanner-c", return_state=True)
    assert refused.is_failed() and "exact duplicate" in refused.message
