"""Load plus faults: the local serving stack as `mnist up` runs it (model server, sync sidecar,
logging gateway, under the stack's supervisor) on an embedded S3 store, with clients sending
single-digit Predicts through the gateway without pause, while faults are injected one after
another. For each fault this prints the calls answered and failed while it lasted, the prediction
logs lost (answered calls whose request id is in no log batch in the store once the gateway has
written what it holds) and the seconds until the clients were answered again.

- server kill: SIGKILL to the model server; the supervisor restarts it. Also printed: the
  restart time (the kill until the new server answers GetModelStatus AVAILABLE) and how long
  the clients took beyond that.
- store outage: the S3 store stopped for ``--outage`` seconds (60 by default), then started again
  at the same address; recovered = the gateway's log spool empty again (its metric), else the
  first log batch written after the store's return.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench.common import save, table, test_digits

CLIENTS = 2


@dataclass
class Load:
    """``CLIENTS`` threads calling Predict through ``address`` one call after another; each call's
    end time, whether it was answered, and the gateway's request id for it."""

    address: str
    request: Any  # a PredictRequest: made before the threads start, so a problem with it is said at once
    calls: list[tuple[float, bool, str | None]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> "Load":
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(CLIENTS)]
        for thread in self.threads:
            thread.start()
        return self

    def client(self) -> None:
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
            while not self.stopping.is_set():
                try:
                    _, call = predict.with_call(self.request, timeout=10)
                    request_id = dict(call.trailing_metadata() or ()).get("x-request-id")
                    self.calls.append((time.monotonic(), True, request_id))
                except grpc.RpcError:
                    self.calls.append((time.monotonic(), False, None))
                    time.sleep(0.01)  # a refused call returns at once: do not spin

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def between(self, start: float, end: float) -> list[tuple[float, bool, str | None]]:
        return [call for call in list(self.calls) if start <= call[0] < end]


def first_answer_after(load: Load, moment: float, timeout: float = 180) -> float:
    """When the clients were first answered after ``moment``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answered = [at for at, ok, _ in load.between(moment, float("inf")) if ok]
        if answered:
            return answered[0]
        time.sleep(0.02)
    raise RuntimeError(f"no call answered within {timeout:.0f} s")


def server_available(address: str) -> bool:
    """Whether the server answers GetModelStatus with a version AVAILABLE, on a channel of its own
    (a channel kept across the kill would measure gRPC's reconnect backoff, not the restart)."""
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "mnist"
    try:
        with grpc.insecure_channel(address) as channel:
            answer = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=1)
    except grpc.RpcError:
        return False
    return any(status.state == status.AVAILABLE for status in answer.model_version_status)


def server_pid(stack_pid: int, port: str) -> int:
    import psutil

    for child in psutil.Process(stack_pid).children(recursive=True):
        command = child.cmdline()
        if "serve" in command and port in command:
            return child.pid
    raise RuntimeError("the model server's process was not found")


def kill_server(stack: Any, load: Load) -> dict[str, Any]:
    import signal

    killed = time.monotonic()
    os.kill(server_pid(os.getpid(), stack.server.rpartition(":")[2]), signal.SIGKILL)
    while not server_available(stack.server):
        if time.monotonic() - killed > 180:
            raise RuntimeError("the model server did not come back within 180 s")
        time.sleep(0.05)
    restarted = time.monotonic()
    resumed = first_answer_after(load, restarted)
    time.sleep(3)
    calls = load.between(killed, time.monotonic())
    return {"fault": "server kill", "answered": sum(ok for _, ok, _ in calls),
            "failed": sum(not ok for _, ok, _ in calls), "restart_seconds": restarted - killed,
            "clients_after_server_seconds": max(0.0, resumed - restarted), "recover_seconds": resumed - killed}


def spool_depth(metrics_url: str) -> float | None:
    """The gateway's spooled log bytes or batches, if it has a spool metric."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(metrics_url, timeout=10).text
    values = [sample.value for family in text_string_to_metric_families(text) if "spool" in family.name
              and family.type == "gauge" for sample in family.samples]
    return sum(values) if values else None


def store_outage(restart_store: Callable[[], None], stop_store: Callable[[], None], stack: Any, load: Load,
                 outage: float) -> dict[str, Any]:
    metrics = f"http://{stack.gateway_rest}/monitoring/prometheus/metrics"
    stopped = time.monotonic()
    stop_store()
    time.sleep(outage)
    restart_store()
    back = time.monotonic()
    recovered = None
    while time.monotonic() - back < 300:
        depth = spool_depth(metrics)
        if depth is not None and depth == 0:
            recovered = time.monotonic()
            break
        if depth is None:
            break
        time.sleep(0.2)
    time.sleep(3)
    calls = load.between(stopped, time.monotonic())
    return {"fault": f"store outage {outage:g} s", "answered": sum(ok for _, ok, _ in calls),
            "failed": sum(not ok for _, ok, _ in calls),
            "recover_seconds": (recovered - back) if recovered else None, "window": (stopped, time.monotonic())}


def logged_request_ids() -> set[str]:
    from storage.logs import PredictionLogStore, day_folders, hours_ago
    from storage.settings import StoreSettings

    logs = PredictionLogStore(StoreSettings())
    found = set()
    for key in logs.batch_keys(day_folders(hours_ago(2))):
        found.update(entry.request_id for entry in logs.read_index(key)[1] if entry)
    return found


def main(outage: float = 60.0) -> dict:
    from bench.serving import make_model, request_for
    from serving.stack import serving_stack
    from storage.embedded import PORT_FLAGS, free_port, start_weed
    from storage.models import ModelStore
    from storage.settings import StoreSettings, patched_environ

    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack_of:
        root = Path(scratch)
        keys = ("bench", "bench-secret-key")
        ports = {flag: free_port() for flag in PORT_FLAGS}
        weeds = [start_weed(root / "s3", *keys, ports=ports)]
        stack_of.callback(lambda: weeds[-1].stop())
        stack_of.enter_context(patched_environ({
            "MNIST_S3_ENDPOINT": weeds[0].endpoint, "AWS_ACCESS_KEY_ID": keys[0], "AWS_SECRET_ACCESS_KEY": keys[1],
            "AWS_REGION": "us-east-1", "MNIST_STATE_DIR": str(root / "state"), "MNIST_RETRY_SECONDS": "5"}))
        store = ModelStore(StoreSettings())
        store.ensure_bucket()
        published = store.publish(make_model(root / "model"), {"dataset": None, "metrics": {}})
        store.set_label("stable", published["version"])
        serving, _ = stack_of.enter_context(serving_stack(root / "state", supervise=True, say=lambda line: None))
        load = Load(serving.gateway, request_for(test_digits(1))).start()
        stack_of.callback(load.stop)
        first_answer_after(load, 0.0)
        time.sleep(5)  # steady load before the first fault
        results = [kill_server(serving, load)]
        outage_result = store_outage(lambda: weeds.append(start_weed(root / "s3", *keys, ports=ports)),
                                     lambda: weeds[-1].stop(), serving, load, outage)
        results.append(outage_result)
        load.stop()
        time.sleep(3)  # the gateway's last batches (it writes every second)
        logged = logged_request_ids()
        for result in results:
            start, end = result.pop("window", (0.0, float("inf")))
            answered_ids = {request_id for _, ok, request_id in load.between(start, end) if ok and request_id}
            result["logs_lost"] = len(answered_ids - logged)
    print(f"{CLIENTS} clients calling Predict (one digit) through the gateway of `mnist up`'s stack, without pause:")
    print(table(["fault", "answered", "failed", "logs lost", "recovered after s", "server restart s",
                 "clients beyond the server s"],
                [[r["fault"], r["answered"], r["failed"], r["logs_lost"],
                  "-" if r["recover_seconds"] is None else f"{r['recover_seconds']:.1f}",
                  f"{r['restart_seconds']:.1f}" if "restart_seconds" in r else "-",
                  f"{r['clients_after_server_seconds']:.2f}" if "clients_after_server_seconds" in r else "-"]
                 for r in results]))
    print(f"written {save('faults', {'outage_seconds': outage, 'clients': CLIENTS, 'results': results})}")
    return {"results": results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--outage", type=float, default=60.0, help="seconds the store is down")
    main(parser.parse_args().outage)
