"""`make bench`: training, flow overhead and serving benchmarks, one after the other.

Each prints its table and writes JSON (with the machine and library versions)
to bench/results/. Run one with --only training|whole|flow|serving|gateway|gateway-memory|light-client|
sidecar|backdoor|hostile|data|scale|transfers|faults|make-run
(make-run only when asked for, with --before).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from bench import (  # noqa: E402
    backdoor,
    data,
    faults,
    flow_overhead,
    gateway,
    gateway_memory,
    hostile,
    light_client,
    make_run_ab,
    scale,
    serving,
    sidecar,
    training,
    transfers,
    whole_runs,
)
from bench.common import libraries, machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=("training", "whole", "flow", "serving", "gateway", "gateway-memory",
                                                 "light-client", "sidecar", "backdoor", "hostile", "data", "scale",
                                                 "transfers", "faults", "make-run"))
    parser.add_argument("--default-seeds", type=int, default=10)
    parser.add_argument("--seed-seeds", type=int, default=3)
    parser.add_argument("--best-seeds", type=int, default=3)
    parser.add_argument("--before", type=Path, default=None, metavar="CHECKOUT",
                        help="an earlier checkout to run beside this one where a benchmark compares (scale: "
                             "mnist drift over a day of logs)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"libraries: {libraries()}")
    if args.only in (None, "serving"):
        print("\n== serving ==")
        serving.main()
    if args.only in (None, "gateway"):
        print("\n== the logging gateway's cost: direct against through the gateway ==")
        gateway.main()
    if args.only in (None, "gateway-memory"):
        print("\n== the logging gateway's memory with its store down ==")
        gateway_memory.main()
    if args.only in (None, "light-client"):
        print("\n== the TensorFlow-free client, installed fresh ==")
        light_client.main()
    if args.only in (None, "sidecar"):
        print("\n== the sidecar install (no TensorFlow, no Prefect) against the trainer install ==")
        sidecar.main()
    if args.only in (None, "hostile"):
        print("\n== hostile requests: a gzip bomb and the largest allowed request, beside a one-image client ==")
        hostile.main()
    if args.only in (None, "backdoor"):
        print("\n== poisoning attacks against the data screen and the backdoor inspection ==")
        backdoor.main()
    if args.only in (None, "flow"):
        print("\n== flow overhead ==")
        flow_overhead.main()
    if args.only in (None, "data"):
        print("\n== growing data: ingest and training with 100,000 new examples ==")
        data.main()
    if args.only in (None, "scale"):
        print("\n== data past memory: 0.1 M, 1 M and 3 M new examples, one epoch each, against MNIST alone ==")
        scale.main(args.before)
    if args.only == "make-run":
        print("\n== make run's whole command, this checkout beside an earlier one ==")
        make_run_ab.main(args.before)
    if args.only in (None, "transfers"):
        print("\n== streaming transfers: publish, verify and sync of a 1 GiB SavedModel ==")
        transfers.main()
    if args.only in (None, "faults"):
        print("\n== load plus faults: a killed model server, a store outage of a minute ==")
        faults.main()
    if args.only in (None, "whole"):
        print("\n== whole commands as a person waits: train default vs seed, make run, Dask candidates ==")
        whole_runs.main()
    if args.only in (None, "training"):
        print(f"\n== training: default x{args.default_seeds} vs seed x{args.seed_seeds}, best x{args.best_seeds} ==")
        training.main(args.default_seeds, args.seed_seeds, args.best_seeds)


if __name__ == "__main__":
    main()
