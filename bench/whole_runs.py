"""Speed as a person waits: whole `mnist` commands, from start to answer.

- `mnist train --no-publish` with the default preset against the same with `--preset seed`,
  interleaved, median of N each; and the default run's fixed cost: the whole process minus its
  fit and its test-set evaluation (the run's own training.json and evaluation.json say those).
- `make run`'s command, `mnist run`, on a fresh state folder, start to the last printed answer,
  and to the process's end.
- `--candidates 2` on a local Dask cluster against two single runs one after the other.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import save, table

REPO = Path(__file__).resolve().parents[1]


def timed_lines(args: list[str], env: dict[str, str], cwd: Path = REPO) -> tuple[float, list[tuple[float, str]]]:
    """The whole command's seconds, and each line it printed (stderr too) with the seconds to it."""
    started, lines = time.perf_counter(), []
    process = subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        lines.append((time.perf_counter() - started, line.rstrip()))
    if process.wait() != 0:
        raise RuntimeError(f"{cwd}: mnist {' '.join(args)} failed: {lines[-5:]}")
    return time.perf_counter() - started, lines


def timed(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    """The whole command's seconds and what it printed."""
    seconds, lines = timed_lines(args, env)
    return seconds, "\n".join(line for _, line in lines)


def run_folder(stdout: str) -> Path:
    return Path(next(line for line in stdout.splitlines() if line.startswith("run outputs:")).split(":", 1)[1].strip())


def train_runs(env: dict[str, str], output: Path, repeats: int) -> dict:
    runs: dict[str, list[dict]] = {"default": [], "seed": []}
    for attempt in range(repeats):  # interleaved: drift in the machine hits both alike
        for preset in ("default", "seed"):
            seconds, stdout = timed(["train", "--no-publish", "--preset", preset, "--output", str(output)], env)
            folder = run_folder(stdout)
            fit = json.loads((folder / "training.json").read_text())["fit_seconds"]
            evaluation = json.loads((folder / "evaluation.json").read_text())
            runs[preset].append({"seconds": seconds, "fit_seconds": fit, "test_accuracy": evaluation["test_accuracy"],
                                 "evaluation_seconds": evaluation["evaluation_seconds"]})
            print(f"  {preset:<8} run {attempt + 1}: {seconds:.1f}s whole ({fit:.1f}s fit), test accuracy "
                  f"{evaluation['test_accuracy']:.4f}", flush=True)
    return runs


def main(repeats: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        env = {**os.environ, "MNIST_STATE_DIR": str(root / "state"), "MNIST_OUTPUT_DIR": str(root / "outputs")}
        for name in ("PREFECT_API_URL", "MNIST_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.pop(name, None)  # as a person's first run: a temporary Prefect API, the embedded store
        runs = train_runs(env, root / "outputs", repeats)
        chain_seconds, chain_lines = timed_lines(["run"], {**env, "MNIST_STATE_DIR": str(root / "chain-state")})
        chain_answer = next(at for at, line in chain_lines if line.endswith(" correct"))  # the last answer
        candidates_seconds, _ = timed(["train", "--no-publish", "--candidates", "2"], env)
        singles = [timed(["train", "--no-publish", "--seed", str(seed)], env)[0] for seed in (0, 1)]
    median = {preset: statistics.median(r["seconds"] for r in runs[preset]) for preset in runs}
    fixed = [r["seconds"] - r["fit_seconds"] - r["evaluation_seconds"] for r in runs["default"]]
    rows = [[preset, median[preset], statistics.median(r["fit_seconds"] for r in runs[preset]),
             statistics.median(r["test_accuracy"] for r in runs[preset]), len(runs[preset])] for preset in runs]
    print(table(["preset", "whole s (median)", "fit s", "test accuracy", "runs"], rows))
    print(f"default / seed, whole process: {median['default'] / median['seed']:.3f}")
    print(f"fixed cost of a default run (whole - fit - test evaluation): {statistics.median(fixed):.1f}s "
          f"(runs: {', '.join(f'{value:.1f}' for value in fixed)})")
    print(f"mnist run (make run), fresh state, start to last answer: {chain_answer:.1f}s "
          f"(to the process's end, stopping all it started: {chain_seconds:.1f}s)")
    print(f"--candidates 2 on a local Dask cluster: {candidates_seconds:.1f}s; two single runs one after the other: "
          f"{sum(singles):.1f}s ({singles[0]:.1f} + {singles[1]:.1f}); ratio {candidates_seconds / sum(singles):.2f}")
    result = {"runs": runs, "median_seconds": median, "ratio": median["default"] / median["seed"],
              "fixed_seconds": fixed, "mnist_run_seconds": chain_answer, "mnist_run_whole_seconds": chain_seconds,
              "candidates_2_seconds": candidates_seconds, "two_single_runs_seconds": singles}
    print(f"written {save('whole_runs', result)}")
    return result


if __name__ == "__main__":
    main()
