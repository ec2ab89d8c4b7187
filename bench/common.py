"""Shared by the benchmarks: machine and library facts, statistics, tables, JSON."""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

RESULTS = Path(__file__).resolve().parent / "results"


@functools.lru_cache(maxsize=1)
def mnist_test_images() -> Any:
    """MNIST's test images (uint8 [N,28,28]), read and verified once per process."""
    from tasks.data import MNIST_SHA256, read_split

    return read_split(Path(os.environ["MNIST_DATA_DIR"]), "t10k", MNIST_SHA256)[0].images


def test_digits(count: int) -> Any:
    """The first ``count`` MNIST test digits as the model takes them (float32 [N,28,28,1]): what
    callers send, so logged requests compress as theirs do. The server's speed is the same for
    any pixels; the logs' size is not."""
    from tasks.data import to_model_input

    return to_model_input(mnist_test_images()[:count])


def machine() -> dict[str, Any]:
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), model)
    memory = Path("/proc/meminfo").read_text().split()[1] if Path("/proc/meminfo").exists() else "0"
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(int(memory) / 2**20, 1),
            "platform": platform.platform(), "python": platform.python_version()}


def libraries() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("tensorflow", "keras", "prefect", "numpy", "grpcio",
                                             "tensorflow-serving-api", "boto3")}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[f"{v:.4f}" if isinstance(v, float) and abs(v) < 10 else
                          f"{v:.1f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    record = {"benchmark": name, "time": stamp, "machine": machine(), "libraries": libraries(), **payload}
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(json.dumps(record, indent=2))
    (RESULTS / f"{name}-latest.json").write_text(json.dumps(record, indent=2))
    return path


def process_tree_cpu(*pids: int) -> Callable[[], float]:
    """The user and system CPU seconds so far of these processes and their children."""
    import psutil

    def seconds() -> float:
        processes = [psutil.Process(pid) for pid in pids]
        processes += [child for process in list(processes) for child in process.children(recursive=True)]
        return sum(sum(process.cpu_times()[:2]) for process in processes)

    return seconds


def own_cpu() -> float:
    return sum(os.times()[:2])  # this process alone, not the servers it started


STORE_VARIABLES = ("MNIST_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")


@contextmanager
def scratch_store(root: Path) -> Iterator[dict[str, str]]:
    """An embedded S3 store under ``root`` for one benchmark, stopped after the block; yields the
    environment a whole `mnist` command runs in against it (outputs and cache under ``root`` too)."""
    from storage.embedded import start_weed
    from storage.settings import PipelineSettings

    weed = start_weed(root / "s3", "bench", "bench-secret-key")
    try:
        yield {**os.environ, "MNIST_S3_ENDPOINT": weed.endpoint, "AWS_ACCESS_KEY_ID": "bench",
               "AWS_SECRET_ACCESS_KEY": "bench-secret-key", "AWS_REGION": "us-east-1",
               "MNIST_OUTPUT_DIR": str(root / "outputs"), "MNIST_CACHE_DIR": str(root / "cache"),
               "MNIST_DATA_DIR": str(PipelineSettings().data_dir)}
    finally:
        weed.stop()
