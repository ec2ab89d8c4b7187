"""The logging gateway's cost per batch-256 call, interleaved between checkouts.

    python bench/gateway_ab.py [--rounds N] [--seconds S] CHECKOUT [CHECKOUT ...]

One server and one S3 store for the whole run; each round starts `mnist gateway` (logging every
call) from each checkout in turn (a `git worktree` of another commit, sharing this environment),
and times one client's batch-256 Predict calls directly and through it, with the CPU each
process spent per call. A single pass of `bench/gateway.py` moves by as much as the change a
commit makes; rounds interleaved on one server let the machine's drift hit every checkout alike.
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

from bench.common import process_tree_cpu  # noqa: E402
from bench.gateway import start_gateway  # noqa: E402
from bench.serving import costed_calls, make_model, start_server  # noqa: E402


def one_round(checkout: Path, server: subprocess.Popen, server_address: str, store_pid: int, env: dict[str, str],
              seconds: float) -> dict[str, float]:
    from storage.embedded import free_port, stop_process

    port = free_port()
    gateway = start_gateway(server_address, port, env, 1.0, cwd=checkout)
    try:
        clocks = {"server": process_tree_cpu(server.pid), "gateway": process_tree_cpu(gateway.pid),
                  "S3 store": process_tree_cpu(store_pid)}
        direct, _, _ = costed_calls(server_address, 256, 1, seconds, clocks)
        through, cost, _ = costed_calls(f"127.0.0.1:{port}", 256, 1, seconds, clocks)
    finally:
        stop_process(gateway.pid)
        gateway.wait(timeout=30)
        gateway.stdout.close()
    return {"/ direct": through / direct, "gateway ms": cost["gateway"], "S3 store ms": cost["S3 store"],
            "server ms": cost["server"]}


def main() -> None:
    from storage.embedded import free_port, start_local_store, stop_local_store, stop_process

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    runs: dict[Path, list[dict[str, float]]] = {checkout: [] for checkout in args.checkouts}
    with tempfile.TemporaryDirectory() as scratch:
        state = Path(scratch) / "state"
        store = start_local_store(state)
        env = {**os.environ, **store.environment(), "MNIST_STATE_DIR": str(state)}
        port = free_port()
        server = start_server(make_model(Path(scratch)).parent, port)
        try:
            for _ in range(args.rounds):
                for checkout in args.checkouts:
                    runs[checkout].append(one_round(checkout.resolve(), server, f"127.0.0.1:{port}", store.pid, env,
                                                    args.seconds))
                    print(checkout, "  ".join(f"{key} {value:.3f}" for key, value in runs[checkout][-1].items()),
                          flush=True)
        finally:
            stop_process(server.pid)
            server.wait(timeout=30)
            server.stdout.close()
            stop_local_store(state)
    for checkout, measured in runs.items():
        print("median", checkout, "  ".join(f"{key} {statistics.median(run[key] for run in measured):.3f}"
                                            for key in measured[0]))


if __name__ == "__main__":
    main()
