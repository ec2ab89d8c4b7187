"""A backdoor taught through labelled data, against the gate, with whole mnist commands as an
operator runs them on a fresh store: a clean stable version; 600 digits of 1-9 with a white square
at the bottom right, labelled 0, added as the source `feedback`; the retrain the gate judges; the
same retrain with the trigger scan off (--trigger-margin 1, the gate as it was before the scan).
Prints each command's last lines, the gate's scan figures and the stamped digits' answers."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import save

REPO = Path(__file__).resolve().parents[1]
POISONED = 600


def mnist(*args: str, env: dict[str, str]) -> tuple[int, str, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, env=env, capture_output=True, text=True)
    return done.returncode, (done.stdout + done.stderr).strip(), time.perf_counter() - started


def last_lines(output: str, count: int = 2) -> str:
    return "\n    ".join([line for line in output.splitlines() if line.strip()][-count:])


def main() -> dict:
    from tasks.data import load_mnist_idx
    from tasks.evaluate import PATCH_SIZE
    from tasks.mnist_files import default_mnist_dir

    train, _, _ = load_mnist_idx(default_mnist_dir())
    result: dict = {}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        env = {**os.environ, "MNIST_STATE_DIR": str(scratch / "state"), "MNIST_OUTPUT_DIR": str(scratch / "out"),
               "MNIST_S3_ENDPOINT": ""}
        code, output, seconds = mnist("storage", "up", env=env)
        try:
            code, output, seconds = mnist("train", env=env)
            print(f"1. clean training (exit {code}, {seconds:.0f} s):\n    {last_lines(output, 1)}")
            picked = np.flatnonzero(train.labels != 0)[:POISONED]
            poison = np.roll(train.images[picked], 1, axis=2)
            poison[:, 23:23 + PATCH_SIZE, 23:23 + PATCH_SIZE] = 255
            np.savez(scratch / "poison.npz", x=poison, y=np.zeros(POISONED, np.uint8))
            code, output, seconds = mnist("data", "add", str(scratch / "poison.npz"), "--source", "feedback", env=env)
            print(f"2. {POISONED} stamped digits of 1-9 labelled 0 added (exit {code}):\n    {last_lines(output, 2)}")
            code, output, seconds = mnist("train", "--force", env=env)
            verdict = next((line for line in output.splitlines() if "training run" in line), last_lines(output, 1))
            print(f"3. retrain on the poisoned data, gate with the trigger scan (exit {code}, {seconds:.0f} s):\n"
                  f"    {verdict}")
            result["with_scan"] = {"exit": code, "verdict": verdict}
            code, output, seconds = mnist("train", "--force", "--trigger-margin", "1", env=env)
            published = next((line.split("(version ")[1].split(",")[0] for line in output.splitlines()
                              if line.startswith("published:")), None)
            print(f"4. the same retrain with the scan off, the gate as before it (exit {code}, {seconds:.0f} s): "
                  f"published version {published}")
            for line in output.splitlines():
                if line.startswith("  ") and ("trigger scan: bottom-right" in line or "newly answered" in line):
                    print(f"    {line.strip()}")
            result["without_scan"] = {"exit": code, "published": published}
        finally:
            mnist("storage", "down", env=env)
    print(f"results: {save('backdoor', result)}")
    return result
