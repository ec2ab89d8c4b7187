"""Growing data: ingest throughput for a 10,000-image folder (the whole `mnist data add` as a
user waits), and a whole `mnist train --no-publish` with 100,000 extra
examples against MNIST alone: wall time and the child's peak resident memory."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import save, scratch_store, table

REPO = Path(__file__).resolve().parents[1]


# Runs one command and prints its peak RSS: a wrapper per command, so each peak is that command's own.
PEAK_WRAPPER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def measured_cli(*args: str, env: dict[str, str], checkout: Path = REPO) -> tuple[float, float, str]:
    """Wall seconds, peak resident memory (MiB) and the output of one whole `mnist` command, as
    ``checkout``'s code runs it."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, sys.executable, "-m", "cli", *args], cwd=checkout,
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"mnist {' '.join(args)} in {checkout} failed: {done.stderr[-2000:]}")
    return seconds, int(done.stderr.strip().splitlines()[-1]) / 1024, done.stdout  # ru_maxrss is in KiB on Linux


def run_cli(*args: str, env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MiB) of one whole `mnist` command."""
    seconds, peak, _ = measured_cli(*args, env=env)
    return seconds, peak


def extra_examples(train_images: np.ndarray, train_labels: np.ndarray, count: int) -> dict[str, np.ndarray]:
    """``count`` digits that are not MNIST's own: training digits shifted by 1-2 pixels."""
    shifts = [(1, 0), (0, 1), (-1, 0), (0, -1), (2, 0), (0, 2)]
    parts, labels = [], []
    for dy, dx in shifts:
        parts.append(np.roll(np.roll(train_images, dy, axis=1), dx, axis=2))
        labels.append(train_labels)
        if sum(len(p) for p in parts) >= count:
            break
    return {"x": np.concatenate(parts)[:count], "y": np.concatenate(labels)[:count]}


def main() -> dict:
    from storage.settings import PipelineSettings
    from tasks.data import load_mnist_idx
    from tasks.synthetic import write_source

    train, _, _ = load_mnist_idx(PipelineSettings().data_dir)
    with tempfile.TemporaryDirectory() as scratch, scratch_store(Path(scratch)) as env:
        root = Path(scratch)
        write_source(train.images[:10000], train.labels[:10000], root / "folder")
        ingest_seconds, ingest_peak = run_cli("data", "add", str(root / "folder"), "--source", "folder", env=env)
        np.savez(root / "extra.npz", **extra_examples(train.images, train.labels, 90_000))
        run_cli("data", "add", str(root / "extra.npz"), "--source", "extra", env=env)
        base_env = {k: v for k, v in env.items() if k != "MNIST_S3_ENDPOINT"}  # MNIST alone
        base_seconds, base_peak = run_cli("train", "--no-publish", env=base_env)
        grown_seconds, grown_peak = run_cli("train", "--no-publish", "--dataset-version", "2",
                                            "--new-data-weight", "1", env=env)
    rows = [["mnist data add (10,000 PNG files)", round(ingest_seconds, 1), round(10000 / ingest_seconds),
             round(ingest_peak)],
            ["mnist train --no-publish, MNIST alone", round(base_seconds, 1), "-", round(base_peak)],
            ["mnist train --no-publish, + 100,000 new examples", round(grown_seconds, 1), "-", round(grown_peak)]]
    print(table(["whole command", "seconds", "images/s", "peak RSS MiB"], rows))
    result = {"ingest_folder_seconds": ingest_seconds, "ingest_images_per_second": 10000 / ingest_seconds,
              "train_mnist_seconds": base_seconds, "train_grown_seconds": grown_seconds,
              "peak_rss_mib": {"ingest": ingest_peak, "train_mnist": base_peak, "train_grown": grown_peak}}
    print(f"results: {save('data', result)}")
    return result
