"""Hostile requests against `mnist serve` behind `mnist gateway`, as processes: the REST gzip bomb
(0.19 MB gzipped, 10,000 images of JSON), then the largest request allowed (4,096 images over gRPC),
each sent five times while one client keeps calling Predict with one image through the gateway.
Prints the peak RSS of the server and the gateway (VmHWM) after each phase and the one-image
client's p50 and p99 in each phase, beside a quiet phase first."""

from __future__ import annotations

import gzip
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import save, table
from bench.serving import make_model, request_for, start_server

REPO = Path(__file__).resolve().parents[1]
PHASE_SECONDS = 8.0


def peak_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def one_image_latencies(address: str, stop: threading.Event, samples: list[float]) -> None:
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    request = request_for(np.zeros((1, 28, 28, 1), np.float32))
    with grpc.insecure_channel(address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        while not stop.is_set():
            started = time.perf_counter()
            stub.Predict(request, timeout=60)
            samples.append((time.perf_counter() - started) * 1000)


def main() -> dict:
    import grpc
    import httpx
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from storage.embedded import free_port, start_weed, stop_process

    row = "[" + ",".join(["[0.5]"] * 28) + "]"
    image = "[" + ",".join([row] * 28) + "]"
    bomb = gzip.compress(('{"instances": [' + ",".join([image] * 10_000) + "]}").encode(), 9)
    largest = request_for(np.random.default_rng(0).random((4096, 28, 28, 1), dtype=np.float32))
    result: dict = {"bomb_gzipped_bytes": len(bomb)}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        make_model(scratch / "models")
        weed = start_weed(scratch / "store", "bench-access", "bench-secret-key-2")
        server_port, server_rest, gateway_port, gateway_rest = (free_port() for _ in range(4))
        server = start_server(scratch / "models" / "mnist", server_port, "--rest-api-port", str(server_rest))
        env = {**os.environ, "MNIST_S3_ENDPOINT": weed.endpoint, "MNIST_S3_BUCKET": "bench-hostile",
               "AWS_ACCESS_KEY_ID": "bench-access", "AWS_SECRET_ACCESS_KEY": "bench-secret-key-2",
               "AWS_REGION": "us-east-1"}
        gateway = subprocess.Popen([sys.executable, "-m", "cli", "gateway", "--upstream", f"127.0.0.1:{server_port}",
                                    "--upstream-rest", f"127.0.0.1:{server_rest}", "--port", str(gateway_port),
                                    "--rest-api-port", str(gateway_rest)], cwd=REPO, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            if "listening on" not in gateway.stdout.readline():
                raise RuntimeError("mnist gateway did not start")
            address = f"127.0.0.1:{gateway_port}"

            def phase(name: str, attack) -> None:
                samples: list[float] = []
                stop = threading.Event()
                client = threading.Thread(target=one_image_latencies, args=(address, stop, samples))
                client.start()
                answers = []
                deadline = time.monotonic() + PHASE_SECONDS
                while time.monotonic() < deadline:
                    answers.append(attack() if attack else None)
                    if not attack:
                        time.sleep(0.5)
                stop.set()
                client.join()
                result[name] = {"server_peak_mib": peak_mib(server.pid), "gateway_peak_mib": peak_mib(gateway.pid),
                                "p50_ms": statistics.median(samples),
                                "p99_ms": float(np.percentile(samples, 99)), "calls": len(samples),
                                "answers": sorted({str(answer) for answer in answers if answer is not None})}

            phase("quiet", None)
            phase("gzip bomb (REST)", lambda: httpx.post(
                f"http://127.0.0.1:{gateway_rest}/v1/models/mnist:predict", content=bomb,
                headers={"Content-Encoding": "gzip"}, timeout=120).status_code)

            def largest_call() -> str:
                with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20),
                                                             ("grpc.max_receive_message_length", 64 << 20)]) as channel:
                    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                    return f"{len(stub.Predict(largest, timeout=120).outputs)} outputs"
            phase("4,096 images (gRPC)", largest_call)
        finally:
            gateway.send_signal(signal.SIGTERM)
            gateway.communicate(timeout=60)
            stop_process(server.pid)
            server.wait(timeout=30)
            server.stdout.close()
            weed.stop()
    rows = [[name, values["answers"] or "-", round(values["server_peak_mib"], 1), round(values["gateway_peak_mib"], 1),
             round(values["p50_ms"], 2), round(values["p99_ms"], 2), values["calls"]]
            for name, values in result.items() if isinstance(values, dict)]
    print(f"gzip bomb: {len(bomb):,} bytes gzipped, 10,000 images of JSON; phases of {PHASE_SECONDS:g} s each, "
          "peaks cumulative (VmHWM)")
    print(table(["phase", "answers", "server peak MiB", "gateway peak MiB", "1-image p50 ms", "1-image p99 ms",
                 "1-image calls"], rows))
    print(f"results: {save('hostile', result)}")
    return result
