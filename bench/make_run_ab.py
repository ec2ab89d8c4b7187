"""`make run`'s whole command (`mnist run`: train, publish, serve, query) in this checkout and in
an earlier one (--before), alternating, each run in fresh output, state and cache folders: whole
seconds, the test accuracy and the answers it printed, side by side."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import save, table

ROUNDS = 2


def make_run(checkout: Path) -> tuple[float, str, str]:
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, **{f"MNIST_{name.upper()}_DIR": str(Path(scratch) / name)
                                for name in ("state", "output", "cache")}}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "cli", "run"], cwd=checkout, env=env, capture_output=True,
                              text=True)
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"mnist run in {checkout} failed: {done.stderr[-2000:]}")
    accuracy = re.search(r"test accuracy: ([0-9.]+)", done.stdout)
    answers = re.search(r"(\d+/\d+) correct", done.stdout)
    return seconds, accuracy.group(1) if accuracy else "?", answers.group(1) if answers else "?"


def main(before: Path | None) -> dict:
    if before is None:
        raise SystemExit("--only make-run compares: give --before CHECKOUT (e.g. git worktree add ../before REV)")
    checkouts = {"this checkout": Path(__file__).resolve().parents[1], f"before ({before.name})": before}
    runs = [(round_, label, *make_run(path)) for round_ in range(1, ROUNDS + 1)
            for label, path in reversed(checkouts.items())]
    print(table(["round", "mnist run", "whole s", "test accuracy", "answers right"],
                [[round_, label, round(seconds, 1), accuracy, answers]
                 for round_, label, seconds, accuracy, answers in runs]))
    result = {"runs": [{"round": r, "checkout": label, "whole_seconds": s, "test_accuracy": a, "answers": n}
                       for r, label, s, a, n in runs]}
    print(f"results: {save('make-run-ab', result)}")
    return result
