"""Training: the `seed` preset (reference recipe) against the `default` preset,
interleaved in one run on one machine, then the `best` preset. Wall time to a
finished model (fit only: bench/whole_runs.py times whole commands), test accuracy,
and the fraction of runs that pass the 0.99 gate."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench.common import save, spread, table

GATE = 0.99


def one_run(data, preset: str, seed: int) -> dict[str, float]:
    """Seconds from an untrained model to a finished one, and its test accuracy."""
    from tasks.recipes import PRESETS
    from tasks.scoring import evaluate_model
    from tasks.train import train_model

    config = PRESETS[preset].model_copy(update={"seed": seed})
    started = time.perf_counter()
    model, history = train_model(data, config)
    seconds = time.perf_counter() - started
    accuracy = evaluate_model(model, data.x_test, data.y_test).test_accuracy
    return {"preset": preset, "seed": seed, "seconds": seconds, "test_accuracy": accuracy,
            "epochs": len(history["loss"])}


def summarise(runs: list[dict], preset: str) -> dict:
    mine = [run for run in runs if run["preset"] == preset]
    return {"wall_seconds": spread([r["seconds"] for r in mine]),
            "test_accuracy": spread([r["test_accuracy"] for r in mine]),
            "gate_pass_rate": sum(r["test_accuracy"] >= GATE for r in mine) / len(mine)}


def main(default_seeds: int, seed_seeds: int, best_seeds: int = 0, best_first_seed: int = 0) -> dict:
    from tasks.data import load_prepared, prepare_dataset

    data_dir = Path(os.environ["MNIST_DATA_DIR"])
    cache = Path(os.environ.get("MNIST_CACHE_DIR", Path.home() / ".cache" / "mnist-pipeline"))
    # Both presets use the same 5,000-image validation split; the test set only scores.
    data = load_prepared(prepare_dataset(data_dir, cache, 5000, 0)[0])
    runs = []
    for seed in range(max(default_seeds, seed_seeds)):  # interleaved, so drift hits both alike
        for preset, count in (("default", default_seeds), ("seed", seed_seeds)):
            if seed < count:
                runs.append(one_run(data, preset, seed))
                print(f"  {preset:<8} seed {seed}: {runs[-1]['seconds']:.1f}s, "
                      f"test accuracy {runs[-1]['test_accuracy']:.4f}", flush=True)
    for seed in range(best_first_seed, best_first_seed + best_seeds):
        runs.append(one_run(data, "best", seed))
        print(f"  best     seed {seed}: {runs[-1]['seconds']:.1f}s, test accuracy {runs[-1]['test_accuracy']:.4f}",
              flush=True)
    ran = {run["preset"] for run in runs}
    summary = {preset: summarise(runs, preset) for preset in ("default", "seed", "best") if preset in ran}
    ratio = (summary["default"]["wall_seconds"]["median"] / summary["seed"]["wall_seconds"]["median"]
             if {"default", "seed"} <= ran else None)
    rows = [[preset, s["wall_seconds"]["median"], s["wall_seconds"]["min"], s["wall_seconds"]["max"],
             s["test_accuracy"]["median"], s["test_accuracy"]["min"], s["test_accuracy"]["max"],
             f"{round(s['gate_pass_rate'] * s['wall_seconds']['n'])}/{s['wall_seconds']['n']}"]
            for preset, s in summary.items()]
    print(table(["preset", "time med s", "min", "max", "acc med", "min", "max", "gate passes"], rows))
    if ratio is not None:
        print(f"default / seed median wall time: {ratio:.3f}")
    path = save("training", {"runs": runs, "summary": summary, "time_ratio": ratio})
    print(f"written {path}")
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--default-seeds", type=int, default=10)
    parser.add_argument("--seed-seeds", type=int, default=3)
    parser.add_argument("--best-seeds", type=int, default=3)
    parser.add_argument("--best-first-seed", type=int, default=0,
                        help="continue an interrupted best series without repeating its seeds")
    arguments = parser.parse_args()
    main(arguments.default_seeds, arguments.seed_seeds, arguments.best_seeds, arguments.best_first_seed)
