"""The REST front ends' latency and throughput, interleaved between checkouts.

    python bench/rest_ab.py [--rounds N] [--calls N] [--seconds S] CHECKOUT [CHECKOUT ...]

Each round starts, from each checkout in turn (a copy of another commit, sharing this environment),
`mnist serve --rest_api_port` and `mnist gateway` in front of it (REST passed through, no call
logged: the HTTP servers are what is measured), and times one keep-alive client's single-image
:predict directly and through the gateway (p50, p99), and one client's batch-256 :predict images/s
directly (bench/serving.py's REST client). Rounds interleave so the machine's drift hits every
checkout alike; the medians over rounds are printed last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import save, table  # noqa: E402
from bench.serving import make_model, rest_latency_ms, rest_throughput  # noqa: E402


def start(checkout: Path, env: dict[str, str], *command: str) -> subprocess.Popen:
    """``mnist COMMAND`` from ``checkout``'s code, once it says it listens."""
    process = subprocess.Popen([sys.executable, "-m", "cli", *command], cwd=checkout,
                               env={**env, "PYTHONPATH": str(checkout)}, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    if "listening" not in process.stdout.readline():
        raise RuntimeError(f"mnist {command[0]} from {checkout} did not start")
    return process


def one_round(checkout: Path, model_dir: Path, env: dict[str, str], calls: int, seconds: float) -> dict[str, float]:
    from storage.embedded import free_port, stop_process

    grpc, rest, gateway_rest = free_port(), free_port(), free_port()
    server = start(checkout, env, "serve", "--port", str(grpc), "--rest_api_port", str(rest),
                   "--model_base_path", str(model_dir))
    processes = [server]
    try:
        processes.append(start(checkout, env, "gateway", "--upstream", f"127.0.0.1:{grpc}", "--port", str(free_port()),
                               "--upstream-rest", f"127.0.0.1:{rest}", "--rest-api-port", str(gateway_rest),
                               "--log-sample-rate", "0"))
        direct = rest_latency_ms(f"http://127.0.0.1:{rest}/v1/models/mnist:predict", calls)
        through = rest_latency_ms(f"http://127.0.0.1:{gateway_rest}/v1/models/mnist:predict", calls)
        rate = rest_throughput(f"http://127.0.0.1:{rest}/v1/models/mnist:predict", 256, seconds)
    finally:
        for process in reversed(processes):
            stop_process(process.pid)
            process.wait(timeout=30)
            process.stdout.close()
    return {"direct p50 ms": statistics.median(direct), "direct p99 ms": statistics.quantiles(direct, n=100)[98],
            "gateway p50 ms": statistics.median(through), "gateway p99 ms": statistics.quantiles(through, n=100)[98],
            "batch-256 images/s": rate}


def main() -> None:
    from storage.embedded import start_local_store, stop_local_store

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    runs: dict[Path, list[dict[str, float]]] = {checkout: [] for checkout in args.checkouts}
    with tempfile.TemporaryDirectory() as scratch:
        state = Path(scratch) / "state"
        store = start_local_store(state)  # the gateway's log store: it starts only with one
        env = {**os.environ, **store.environment(), "MNIST_STATE_DIR": str(state)}
        model_dir = make_model(Path(scratch)).parent
        try:
            for _ in range(args.rounds):
                for checkout in args.checkouts:
                    runs[checkout].append(one_round(checkout.resolve(), model_dir, env, args.calls, args.seconds))
                    print(checkout, "  ".join(f"{key} {value:.2f}" for key, value in runs[checkout][-1].items()),
                          flush=True)
        finally:
            stop_local_store(state)
    keys = list(next(iter(runs.values()))[0])
    medians = {str(checkout): {key: statistics.median(run[key] for run in measured) for key in keys}
               for checkout, measured in runs.items()}
    print(f"medians over {args.rounds} rounds ({args.calls} single-image calls per path a round):")
    print(table(["checkout", *keys], [[checkout, *values.values()] for checkout, values in medians.items()]))
    print(f"written {save('rest_ab', {'medians': medians, 'rounds': {str(k): v for k, v in runs.items()}})}")


if __name__ == "__main__":
    main()
