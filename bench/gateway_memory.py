"""The logging gateway's memory while its store is down: batch-256 Predict calls keep coming and
every one is logged, so the log queue is all that stands between the gateway and its memory
limit (1 GiB in the Kubernetes manifest). Each `mnist gateway` runs as its own process against
the local server, with the S3 store stopped once it has started; this prints its peak resident
memory, the calls answered and failed, and the logs dropped, for the default byte budget of the
queue and for one too large to bind (as before the budget: 10,000 calls of a megabyte).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

from bench.common import save, table, test_digits
from bench.gateway import start_gateway
from bench.serving import closed_loop_calls, make_model, request_for, start_server

BUDGETS_MIB = (256, 100_000)  # the default, and none in effect


def peak_rss_while(pid: int, work) -> tuple[int, object]:
    """The process's peak resident bytes, sampled every 0.1 s while ``work()`` runs, and its result."""
    import psutil

    process, peak, done = psutil.Process(pid), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = work()
    finally:
        done.set()
        watcher.join()
    return peak[0], result


def dropped_logs(metrics_url: str) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text)
               if family.name == "mnist_gateway_logs_dropped" for sample in family.samples)


def one_budget(server_address: str, scratch: Path, budget_mib: int, seconds: float) -> dict:
    from storage.embedded import free_port, start_local_store, stop_local_store, stop_process

    state = scratch / f"state-{budget_mib}"
    store = start_local_store(state)
    env = {**os.environ, **store.environment(), "MNIST_STATE_DIR": str(state)}
    port, rest_port = free_port(), free_port()
    gateway = start_gateway(server_address, port, env, 1.0, None, "--log-queue-mib", str(budget_mib),
                            "--rest-api-port", str(rest_port))
    try:
        stop_local_store(state)  # the store goes down; the gateway keeps answering
        request = request_for(test_digits(256))
        peak, (answered, failed, _) = peak_rss_while(
            gateway.pid, lambda: closed_loop_calls(f"127.0.0.1:{port}", request, 2, seconds))
        dropped = dropped_logs(f"http://127.0.0.1:{rest_port}/monitoring/prometheus/metrics")
    finally:
        stop_process(gateway.pid)
        gateway.wait(timeout=60)
        gateway.stdout.close()
    return {"log_queue_mib": budget_mib, "peak_rss_mib": peak / 2**20, "answered": answered, "failed": failed,
            "logs_dropped": dropped}


def main(seconds: float = 20.0) -> dict:
    from storage.embedded import free_port, stop_process

    with tempfile.TemporaryDirectory() as scratch:
        port = free_port()
        server = start_server(make_model(Path(scratch)).parent, port)
        try:
            runs = [one_budget(f"127.0.0.1:{port}", Path(scratch), budget, seconds) for budget in BUDGETS_MIB]
        finally:
            stop_process(server.pid)
            server.wait(timeout=30)
            server.stdout.close()
    print(f"the gateway with its store down, {seconds:g} s of batch-256 Predict calls from 2 clients, "
          "every call logged:")
    print(table(["--log-queue-mib", "peak RSS MiB", "calls answered", "calls failed", "logs dropped"],
                [[run["log_queue_mib"], run["peak_rss_mib"], run["answered"], run["failed"], run["logs_dropped"]]
                 for run in runs]))
    print(f"written {save('gateway_memory', {'seconds': seconds, 'runs': runs})}")
    return {"runs": runs}


if __name__ == "__main__":
    main()
