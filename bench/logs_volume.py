"""A day of a busy service's prediction logs, read by the drift flow: 1,000,000 logged
single-image requests (synthetic: MNIST test digits through the gateway's own record framing, in
its batches of 256), then the whole `mnist drift` over them, this checkout's against the one
before drift summarised as it read (given as a folder holding that checkout), side by side:
seconds and peak resident memory."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import STORE_VARIABLES, mnist_test_images, save, scratch_store, table
from bench.data import measured_cli, run_cli

REQUESTS = 1_000_000
BATCH = 256  # records per log object, as the gateway writes them


def synthetic_records(count: int) -> list[list[bytes]]:
    """``count`` distinct logged calls (one digit each, with the model's kind of answer), framed
    as the gateway frames them; the day repeats them."""
    from mnist_client.protos import predict_pb2
    from mnist_client.tensors import to_tensor_proto
    from serving.gateway.log_records import prediction_log

    digits = mnist_test_images()[:count].astype(np.float32)[..., np.newaxis] / 255.0
    rng = np.random.default_rng(0)
    records = []
    for digit in digits:
        request, response = predict_pb2.PredictRequest(), predict_pb2.PredictResponse()
        request.model_spec.name = "mnist"
        request.inputs["image"].CopyFrom(to_tensor_proto(digit[np.newaxis]))
        answer = rng.dirichlet(np.full(10, 0.1)).astype(np.float32)[np.newaxis]
        response.outputs["probabilities"].CopyFrom(to_tensor_proto(answer))
        records.append(prediction_log(b"", request.SerializeToString(), response.SerializeToString()))
    return records


def write_day(logs, requests: int) -> float:
    """``requests`` logged calls within the last hours, answered by version 1; returns seconds."""
    from datetime import datetime, timedelta, timezone

    from storage.logs import LogEntry

    distinct = synthetic_records(1000)
    started = time.perf_counter()
    now = datetime.now(timezone.utc) - timedelta(hours=1)
    for first in range(0, requests, BATCH):
        count = min(BATCH, requests - first)
        stamp = (now + timedelta(milliseconds=first // BATCH)).isoformat(timespec="milliseconds")
        entries = [LogEntry(f"bench-{first + i:08d}", stamp, 1, "", "grpc", 1) for i in range(count)]
        logs.write_batch(entries, [distinct[(first + i) % len(distinct)] for i in range(count)])
    return time.perf_counter() - started


def run_drift(checkout: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """The whole `mnist drift` of ``checkout``: seconds, peak RSS (MiB) and its first verdict line."""
    seconds, peak, output = measured_cli("drift", env=env, checkout=checkout)
    verdicts = [line for line in output.splitlines() if line.startswith("version ")]
    return seconds, peak, verdicts[0] if verdicts else output[-200:]


def main(before: Path | None = None) -> dict:
    from storage.logs import PredictionLogStore
    from storage.settings import TrafficSettings

    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as scratch, scratch_store(Path(scratch)) as env:
        os.environ.update({name: env[name] for name in STORE_VARIABLES})
        # version 1 with its reference statistics, as a publish leaves it (a smoke model: cost, not accuracy)
        run_cli("train", "--preset", "smoke", "--threshold", "0", "--slice-threshold", "0", env=env)
        logs = PredictionLogStore(TrafficSettings())
        logs.ensure_bucket()
        write_seconds = write_day(logs, REQUESTS)
        runs = [("this checkout", *run_drift(repo, env))]
        if before is not None:
            runs.append((f"before ({before.name})", *run_drift(before, env)))
    print(f"wrote {REQUESTS:,} logged single-image requests as {REQUESTS // BATCH + 1:,} log objects in "
          f"{write_seconds:.1f} s")
    print(table(["mnist drift over them", "whole s", "peak RSS MiB", "says"],
                [[label, round(seconds, 1), round(peak), said[:80]] for label, seconds, peak, said in runs]))
    result = {"requests": REQUESTS, "write_seconds": write_seconds,
              "runs": [{"checkout": label, "whole_seconds": seconds, "peak_rss_mib": peak, "said": said}
                       for label, seconds, peak, said in runs]}
    print(f"results: {save('logs-volume', result)}")
    return result
