"""Serving: gRPC Predict latency and throughput against the same SavedModel called in-process,
and the REST API's (TF Serving's JSON) beside them.

The server runs as its own process (`mnist serve`), as it would in production;
the gRPC client uses the tensorflow-serving-api stubs with tensor_content requests, the REST
client httpx on one keep-alive connection.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.common import own_cpu, process_tree_cpu, save, table, test_digits

BATCHES = (1, 32, 256)
CLIENTS = (1, 4)


def make_model(directory: Path) -> Path:
    """A reference-architecture SavedModel (quickly trained: speed does not depend on the weights)."""
    import keras

    from tasks.export import export_saved_model
    from tasks.model import build_model
    from tasks.recipes import ModelConfig

    keras.utils.set_random_seed(0)
    return export_saved_model(build_model(ModelConfig()), directory / "mnist" / "1",
                              warmup_images=np.random.default_rng(0).random((32, 28, 28, 1), dtype=np.float32))


BATCHING_FILE = Path(__file__).resolve().parents[1] / "serving" / "deploy" / "batching_parameters.txt"
MONITORING_FILE = BATCHING_FILE.parent / "monitoring.config"


def start_server(model_dir: Path, port: int, *flags: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port),
                                "--model-base-path", str(model_dir), *flags], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    if "listening" not in process.stdout.readline():
        raise RuntimeError("mnist serve did not start")
    return process


def serve_prediction_service(port: int, handlers: dict[str, Callable[[bytes, Any], bytes]], threads: int) -> None:
    """A bare PredictionService on 127.0.0.1:``port`` whose methods take and answer bytes, never parsed;
    says "listening" once it does, then serves until stopped."""
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(threads))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", {
        name: grpc.unary_unary_rpc_method_handler(handler) for name, handler in handlers.items()})])
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()


def start_bench_server(module: str, *args: str) -> subprocess.Popen:
    """``python -m MODULE ARGS`` from this checkout, once it says it is listening."""
    process = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                               cwd=Path(__file__).resolve().parents[1])
    if "listening" not in process.stdout.readline():
        raise RuntimeError(f"{module} {' '.join(args)} did not start")
    return process


def echo(port: int) -> None:
    """The floor of any Python gRPC server under this load: Predict answered with fixed bytes (a
    single image's answer), nothing parsed, nothing run; the thread pool `mnist serve` has."""
    from tensorflow_serving.apis import predict_pb2

    from serving.model_server.tensors import to_tensor_proto

    answer = predict_pb2.PredictResponse()
    answer.model_spec.name, answer.model_spec.version.value = "mnist", 1
    answer.outputs["probabilities"].CopyFrom(to_tensor_proto(np.full((1, 10), 0.1, np.float32)))
    reply = answer.SerializeToString()
    serve_prediction_service(port, {"Predict": lambda body, context: reply}, 4 * (os.cpu_count() or 1))


def request_for(images: np.ndarray):
    from tensorflow_serving.apis import predict_pb2

    from serving.model_server.tensors import to_tensor_proto

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.inputs["image"].CopyFrom(to_tensor_proto(images))
    return request


def latency_ms(address: str, calls: int) -> list[float]:
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    request = request_for(test_digits(1))
    with grpc.insecure_channel(address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for _ in range(50):
            stub.Predict(request, timeout=10)
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            stub.Predict(request, timeout=10)
            samples.append((time.perf_counter() - started) * 1000)
    return samples


def closed_loop_calls(address: str, request, clients: int, seconds: float) -> tuple[int, int, float]:
    """``clients`` threads, each with its own channel, sending ``request`` as Predict one call after
    another for ``seconds``, after a first call each that is not timed: (calls answered, calls
    failed, the first calls' failures included, and the seconds taken)."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    answered, failed = [0] * clients, [0] * clients
    start = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            try:
                stub.Predict(request, timeout=30)
            except grpc.RpcError:
                failed[index] += 1
            start.wait()
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                try:
                    stub.Predict(request, timeout=30)
                    answered[index] += 1
                except grpc.RpcError:
                    failed[index] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return sum(answered), sum(failed), time.perf_counter() - began


def answered_calls(address: str, request, clients: int, seconds: float) -> tuple[int, float]:
    """``closed_loop_calls``'s answered calls and seconds; a run with failed calls is refused, never
    measured on the threads that survived."""
    answered, failed, elapsed = closed_loop_calls(address, request, clients, seconds)
    if failed:
        raise RuntimeError(f"{failed} of {answered + failed} Predict calls to {address} failed")
    return answered, elapsed


def grpc_throughput(address: str, batch: int, clients: int, seconds: float) -> float:
    """Images per second with ``clients`` threads, each with its own channel, for ``seconds``."""
    answered, elapsed = answered_calls(address, request_for(test_digits(batch)), clients, seconds)
    return answered * batch / elapsed


def costed_calls(address: str, batch: int, clients: int, seconds: float, clocks: dict[str, Callable[[], float]]
                 ) -> tuple[float, dict[str, float], float]:
    """Images/s from ``clients`` closed-loop clients sending ``batch`` images a call; the CPU
    milliseconds each clock's process spent per call answered; and how many cores all of them kept
    busy (over the whole measure, the clients' first calls and channels included)."""
    before = {name: clock() for name, clock in clocks.items()}
    started = time.perf_counter()
    answered, elapsed = answered_calls(address, request_for(test_digits(batch)), clients, seconds)
    wall = time.perf_counter() - started
    spent = {name: clock() - before[name] for name, clock in clocks.items()}
    return (answered * batch / elapsed, {name: 1000 * value / answered for name, value in spent.items()},
            sum(spent.values()) / wall)


def rest_body(batch: int) -> bytes:
    images = np.random.default_rng(4).random((batch, 28, 28, 1), dtype=np.float32)
    return json.dumps({"instances": images.tolist()}).encode()


def rest_latency_ms(url: str, calls: int) -> list[float]:
    import httpx

    body, samples = rest_body(1), []
    with httpx.Client(timeout=30) as client:
        for index in range(50 + calls):
            started = time.perf_counter()
            client.post(url, content=body).raise_for_status()
            if index >= 50:
                samples.append((time.perf_counter() - started) * 1000)
    return samples


def rest_throughput(url: str, batch: int, seconds: float) -> float:
    """Images per second from one client posting ``batch`` images per call (JSON encoded once)."""
    import httpx

    body, done = rest_body(batch), 0
    with httpx.Client(timeout=60) as client:
        client.post(url, content=body).raise_for_status()
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            client.post(url, content=body).raise_for_status()
            done += batch
    return done / (time.perf_counter() - started)


def in_process_throughput(model_dir: Path, batch: int, seconds: float) -> float:
    import tensorflow as tf

    signature = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    images = tf.constant(np.random.default_rng(2).random((batch, 28, 28, 1), dtype=np.float32))
    signature(image=images)
    done, deadline = 0, time.perf_counter() + seconds
    began = time.perf_counter()
    while time.perf_counter() < deadline:
        signature(image=images)["probabilities"].numpy()
        done += batch
    return done / (time.perf_counter() - began)


def whole_predict_seconds(address: str, image_file: Path, runs: int = 5) -> float:
    """Median time of the whole `mnist predict FILE` command a person runs, process start to answer."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cli", "predict", "--server", address, str(image_file)],
                       check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def batch_figures(metrics_url: str) -> dict[str, float]:
    """What the server's own batching-session metrics (TF Serving's) say of the load so far."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    prefix, totals = ":tensorflow:serving:batching_session:", {}
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        for sample in family.samples:
            if sample.name.startswith(prefix) and not sample.name.endswith("_bucket"):
                name = sample.name.removeprefix(prefix)
                totals[name] = totals.get(name, 0.0) + sample.value
    runs = totals["processed_batch_size_count"]
    return {"signature_calls": runs, "mean_batch": totals["processed_batch_size_sum"] / runs,
            "mean_queuing_us": totals["queuing_latency_sum"] / totals["queuing_latency_count"]}


def batching(saved: Path, seconds: float, latency_calls: int, clients: int = 8) -> dict:
    """Single images from ``clients`` concurrent clients, with batching off and on (the production
    batching_parameters.txt), and against a bare gRPC server's fixed answer (the floor under both); one
    client's p50 either way, and the whole `mnist predict` of one image."""
    from storage.embedded import free_port, stop_process

    image_file = saved.parent.parent / "one-image.npy"
    np.save(image_file, np.random.default_rng(3).random((1, 28, 28, 1), dtype=np.float32))
    rates, cpu, busy, p50, whole, batches = {}, {}, {}, {}, {}, {}
    for name, flags in (("off", ()), ("on", ("--enable-batching", "--batching-parameters-file", str(BATCHING_FILE)))):
        port, rest_port = free_port(), free_port()
        server = start_server(saved.parent, port, *flags, "--rest-api-port", str(rest_port),
                              "--monitoring-config-file", str(MONITORING_FILE))
        try:
            address = f"127.0.0.1:{port}"
            rates[name], cpu[name], busy[name] = costed_calls(
                address, 1, clients, seconds, {"server": process_tree_cpu(server.pid), "clients": own_cpu})
            if name == "on":
                batches = batch_figures(f"http://127.0.0.1:{rest_port}/monitoring/prometheus/metrics")
            p50[name] = statistics.median(latency_ms(address, latency_calls))
            whole[name] = whole_predict_seconds(address, image_file)
        finally:
            stop_process(server.pid)
            server.wait(timeout=10)
            server.stdout.close()
    port = free_port()
    floor = start_bench_server("bench.serving", "echo", str(port))
    try:
        rates["echo"], cpu["echo"], busy["echo"] = costed_calls(
            f"127.0.0.1:{port}", 1, clients, seconds, {"server": process_tree_cpu(floor.pid), "clients": own_cpu})
    finally:
        stop_process(floor.pid)
        floor.wait(timeout=10)
        floor.stdout.close()
    print(f"single images from {clients} concurrent clients: {rates['off']:.0f} images/s with batching off, "
          f"{rates['on']:.0f} with batching on ({rates['on'] / rates['off']:.2f}x)")
    print(f"the batching server's own metrics for that load: {batches['signature_calls']:.0f} signature calls, "
          f"{batches['mean_batch']:.2f} images per call, {batches['mean_queuing_us']:.0f} us in the queue per request "
          f"(mean; the warm-up call included)")
    for process in ("server", "clients"):
        print(f"CPU ms per image, {process}: {cpu['off'][process]:.3f} batching off, {cpu['on'][process]:.3f} on")
    print(f"cores busy under that load (of {os.cpu_count()}): {busy['off']:.2f} batching off, {busy['on']:.2f} on")
    print(f"the same load against a bare Python gRPC server answering fixed bytes (no parsing, no model): "
          f"{rates['echo']:.0f} calls/s; CPU ms per call: server {cpu['echo']['server']:.3f}, clients "
          f"{cpu['echo']['clients']:.3f}; cores busy {busy['echo']:.2f}")
    print(f"one client, single image, p50: {p50['off']:.2f} ms batching off, {p50['on']:.2f} ms batching on")
    print(f"whole `mnist predict` of one image, process start to answer (median of 5): {whole['off']:.2f} s "
          f"batching off, {whole['on']:.2f} s batching on")
    return {"clients": clients, "images_per_s": rates, "cpu_ms_per_image": cpu, "cores_busy": busy,
            "single_client_p50_ms": p50, "whole_predict_s": whole, "batching_metrics": batches}


def main(seconds: float = 5.0, latency_calls: int = 2000) -> dict:
    from storage.embedded import free_port, stop_process

    with tempfile.TemporaryDirectory() as scratch:
        saved = make_model(Path(scratch))
        port, rest_port = free_port(), free_port()
        server = start_server(saved.parent, port, "--rest_api_port", str(rest_port))
        address, url = f"127.0.0.1:{port}", f"http://127.0.0.1:{rest_port}/v1/models/mnist:predict"
        try:
            samples = latency_ms(address, latency_calls)
            grpc_rates = {(b, c): grpc_throughput(address, b, c, seconds) for b in BATCHES for c in CLIENTS}
            rest_samples = rest_latency_ms(url, latency_calls // 4)
            rest_rate = rest_throughput(url, 256, seconds)
        finally:
            stop_process(server.pid)
            server.wait(timeout=10)
            server.stdout.close()
        local_rates = {b: in_process_throughput(saved, b, seconds) for b in BATCHES}
        batched = batching(saved, seconds, latency_calls // 2)
    quantiles = statistics.quantiles(samples, n=100)
    latency = {"p50_ms": statistics.median(samples), "p99_ms": quantiles[98], "calls": len(samples)}
    print(f"single-image Predict over gRPC: p50 {latency['p50_ms']:.2f} ms, p99 {latency['p99_ms']:.2f} ms "
          f"({len(samples)} calls)")
    rest = {"p50_ms": statistics.median(rest_samples), "p99_ms": statistics.quantiles(rest_samples, n=100)[98],
            "calls": len(rest_samples), "batch_256_images_per_s": rest_rate}
    print(f"single-image :predict over REST (JSON, one keep-alive connection): p50 {rest['p50_ms']:.2f} ms, "
          f"p99 {rest['p99_ms']:.2f} ms ({len(rest_samples)} calls)")
    print(f"batch-256 :predict over REST, one client: {rest_rate:.0f} images/s "
          f"(gRPC, the same load: {grpc_rates[(256, 1)]:.0f})")
    rows = [[b, c, grpc_rates[(b, c)], local_rates[b], grpc_rates[(b, c)] / local_rates[b]]
            for b in BATCHES for c in CLIENTS]
    print(table(["batch", "clients", "gRPC images/s", "in-process images/s", "ratio"], rows))
    throughput = [{"batch": b, "clients": c, "grpc_images_per_s": grpc_rates[(b, c)],
                   "in_process_images_per_s": local_rates[b]} for b in BATCHES for c in CLIENTS]
    path = save("serving", {"latency": latency, "throughput": throughput, "batching": batched, "rest": rest,
                            "seconds_per_point": seconds})
    print(f"written {path}")
    return {"latency": latency, "throughput": throughput}


if __name__ == "__main__":
    if sys.argv[1:2] == ["echo"]:
        echo(int(sys.argv[2]))
    else:
        main()
