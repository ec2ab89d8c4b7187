"""The fixed cost of a default `mnist train --no-publish`, interleaved between checkouts.

    python bench/fixed_cost_ab.py [--runs N] CHECKOUT [CHECKOUT ...]

Each checkout (a `git worktree` of another commit, sharing this environment) runs the command
in turn, N times, on one fresh state folder, as `make bench` runs it. Per run it prints the
whole time, the time to the flow's first log line ("begin"), the time after training beyond
the test evaluation ("after train"), the fit, and the fixed cost (whole - fit - test
evaluation, as bench/whole_runs.py); then the medians. Interleaving lets the machine's drift
hit every checkout alike, so a change to the run's fixed cost shows against the commit before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from bench.whole_runs import run_folder, timed_lines  # noqa: E402


def timed_run(checkout: Path, env: dict[str, str]) -> dict[str, float]:
    whole, lines = timed_lines(["train", "--no-publish"], env, cwd=checkout)
    folder = run_folder("\n".join(line for _, line in lines))
    fit = json.loads((folder / "training.json").read_text())["fit_seconds"]
    evaluation = json.loads((folder / "evaluation.json").read_text())["evaluation_seconds"]
    begin = next(at for at, line in lines if "Beginning flow run" in line)
    trained = next(at for at, line in lines if "Task run 'train-" in line and "Finished" in line)
    return {"whole": whole, "begin": begin, "after train": whole - trained - evaluation, "fit": fit,
            "fixed": whole - fit - evaluation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", type=Path)
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "MNIST_STATE_DIR": f"{scratch}/state", "MNIST_OUTPUT_DIR": f"{scratch}/outputs"}
        for name in ("PREFECT_API_URL", "MNIST_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.pop(name, None)  # as a person's first run: a temporary Prefect API, no store
        runs: dict[Path, list[dict[str, float]]] = {checkout: [] for checkout in args.checkouts}
        for _ in range(args.runs):
            for checkout in args.checkouts:
                runs[checkout].append(timed_run(checkout.resolve(), env))
                print(checkout, "  ".join(f"{key} {value:.2f}s" for key, value in runs[checkout][-1].items()),
                      flush=True)
    for checkout, measured in runs.items():
        print("median", checkout, "  ".join(f"{key} {statistics.median(run[key] for run in measured):.2f}s"
                                            for key in measured[0]))


if __name__ == "__main__":
    main()
