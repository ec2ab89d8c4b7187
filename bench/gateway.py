"""The logging gateway's cost: the same server called directly, through `mnist gateway`
(logging every call to a real S3 store), and through a bare pass-through (the fewest lines of
Python gRPC that forward a call: the floor of any gateway written with grpcio), in one run,
interleaved.

Single-image Predict p50/p99 (client to answer), and batch-256 images/s with one and four
clients. Each process is its own: server, gateway, pass-through, S3 store, and this client.

    python -m bench.gateway passthrough PORT UPSTREAM     # the bare pass-through alone
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import own_cpu, process_tree_cpu, save, table
from bench.serving import (
    costed_calls,
    grpc_throughput,
    latency_ms,
    make_model,
    serve_prediction_service,
    start_bench_server,
    start_server,
)

ROUNDS = 4  # latency blocks per path, alternating, so drift in the machine hits both alike
SAMPLED_RATE = 0.1  # the Kubernetes manifest's rate


def start_gateway(upstream: str, port: int, env: dict[str, str], sample_rate: float,
                  cwd: Path | None = None, *flags: str) -> subprocess.Popen:
    """`mnist gateway` as its own process, from ``cwd``'s code (a checkout) or this one's."""
    process = subprocess.Popen([sys.executable, "-m", "cli", "gateway", "--upstream", upstream,
                                "--port", str(port), "--log-sample-rate", str(sample_rate),
                                "--log-flush-seconds", "1", *flags], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, start_new_session=True, cwd=cwd)
    if "listening" not in process.stdout.readline():
        raise RuntimeError("mnist gateway did not start")
    return process


def passthrough(port: int, upstream: str) -> None:
    """Forward PredictionService calls as bytes, nothing else."""
    import grpc

    channel = grpc.insecure_channel(upstream)
    methods = {name: channel.unary_unary(f"/tensorflow.serving.PredictionService/{name}")
               for name in ("Predict", "GetModelMetadata")}
    serve_prediction_service(port, {name: lambda body, context, call=call: call(body, timeout=context.time_remaining())
                                    for name, call in methods.items()}, 16)


def main(seconds: float = 5.0, calls_per_round: int = 500, sample_rate: float = 1.0) -> dict:
    from storage.embedded import free_port, start_local_store, stop_local_store, stop_process

    with tempfile.TemporaryDirectory() as scratch:
        state = Path(scratch) / "state"
        store = start_local_store(state)
        env = {**os.environ, **store.environment(), "MNIST_STATE_DIR": str(state)}
        saved = make_model(Path(scratch))
        server_port, gateway_port, sampled_port, bare_port = (free_port() for _ in range(4))
        server = start_server(saved.parent, server_port)
        gateway = start_gateway(f"127.0.0.1:{server_port}", gateway_port, env, sample_rate)
        sampled = start_gateway(f"127.0.0.1:{server_port}", sampled_port, env, SAMPLED_RATE)
        bare = start_bench_server("bench.gateway", "passthrough", str(bare_port), f"127.0.0.1:{server_port}")
        paths = {"direct": f"127.0.0.1:{server_port}", "gateway": f"127.0.0.1:{gateway_port}",
                 "pass-through": f"127.0.0.1:{bare_port}"}
        throughput_paths = {"direct": paths["direct"], "gateway": paths["gateway"],
                            "gateway-sampled": f"127.0.0.1:{sampled_port}"}
        try:
            samples: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(ROUNDS):
                for name, address in paths.items():
                    samples[name] += latency_ms(address, calls_per_round)
            rates = {(name, clients): grpc_throughput(address, 256, clients, seconds)
                     for clients in (1, 4) for name, address in throughput_paths.items()}
            clocks = {"server": process_tree_cpu(server.pid), "gateway": process_tree_cpu(gateway.pid, sampled.pid),
                      "S3 store": process_tree_cpu(store.pid), "client": own_cpu}
            costs = {name: costed_calls(address, 256, 1, seconds, clocks)[1]
                     for name, address in throughput_paths.items()}
        finally:
            for process in (bare, sampled, gateway, server):
                stop_process(process.pid)
                process.wait(timeout=30)
                process.stdout.close()
            stop_local_store(state)
    latency = {name: {"p50_ms": statistics.median(values), "p99_ms": statistics.quantiles(values, n=100)[98],
                      "calls": len(values)} for name, values in samples.items()}
    added = latency["gateway"]["p50_ms"] - latency["direct"]["p50_ms"]
    floor = latency["pass-through"]["p50_ms"] - latency["direct"]["p50_ms"]
    print(f"single-image Predict, {len(samples['direct'])} calls per path, logging {sample_rate:.0%} of calls:")
    print(table(["path", "p50 ms", "p99 ms"],
                [[name, values["p50_ms"], values["p99_ms"]] for name, values in latency.items()]))
    print(f"p50 added by the gateway: {added:.3f} ms (by the bare pass-through: {floor:.3f} ms)")
    rows = [[clients, rates[("direct", clients)], rates[("gateway", clients)],
             rates[("gateway", clients)] / rates[("direct", clients)], rates[("gateway-sampled", clients)],
             rates[("gateway-sampled", clients)] / rates[("direct", clients)]] for clients in (1, 4)]
    print(f"batch-256 Predict throughput (the gateway logging {sample_rate:.0%}, and {SAMPLED_RATE:.0%}, of calls; "
          "the S3 store on the same 2 cores):")
    print(table(["clients", "direct images/s", f"gateway {sample_rate:.0%}", "/ direct",
                 f"gateway {SAMPLED_RATE:.0%}", "/ direct"], rows))
    print("CPU ms per batch-256 call, by process (one client, a second pass):")
    print(table(["path", *clocks], [[name, *cost.values()] for name, cost in costs.items()]))
    result = {"latency": latency, "p50_added_ms": added, "passthrough_p50_added_ms": floor, "sample_rate": sample_rate,
              "cpu_ms_per_batch_256_call": costs,
              "throughput_batch_256": [{"clients": c, "direct_images_per_s": rates[("direct", c)],
                                        "gateway_images_per_s": rates[("gateway", c)],
                                        "gateway_sampled_images_per_s": rates[("gateway-sampled", c)],
                                        "sampled_rate": SAMPLED_RATE} for c in (1, 4)]}
    print(f"written {save('gateway', result)}")
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["passthrough"]:
        passthrough(int(sys.argv[2]), sys.argv[3])
    else:
        main()
