"""Streaming transfers: peak resident memory of publish, verify and sync of a 1 GiB SavedModel
(one large variable), each in its own process, against that process's baseline after imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import save, table

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30

# Run in a child: baseline after imports, peak reset (clear_refs 5), the operation, then the peak.
MEASURE = '''
import json, sys, time
from pathlib import Path
from storage.models import ModelStore
from storage.settings import StoreSettings
from serving.sync import sync_once

def status(field):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines()
                if l.startswith(field + ":")) / 1024

store = ModelStore(StoreSettings())
store.ensure_bucket()
baseline = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
started = time.perf_counter()
action, path = sys.argv[1], Path(sys.argv[2])
if action == "publish":
    store.publish(path, {"flow_run_id": "bench"})
elif action == "verify":
    store.verify(store.complete_versions()[-1])
else:
    sync_once(store, path)
print(json.dumps({"seconds": time.perf_counter() - started, "baseline_mib": baseline,
                  "peak_mib": status("VmHWM")}))
'''


def make_large_saved_model(directory: Path, size: int) -> None:
    """A SavedModel whose variable file is ``size`` bytes (a float32 variable of zeros)."""
    script = ("import sys, tensorflow as tf\n"
              "class M(tf.Module):\n"
              "    def __init__(self):\n"
              f"        self.v = tf.Variable(tf.zeros([{size // 4}], tf.float32))\n"
              "    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])\n"
              "    def __call__(self, x):\n"
              "        return x + self.v[0]\n"
              "m = M()\n"
              "tf.saved_model.save(m, sys.argv[1], signatures=m.__call__)\n")
    subprocess.run([sys.executable, "-c", script, str(directory)], check=True, capture_output=True)


def measure(action: str, path: Path, env: dict[str, str]) -> dict[str, float]:
    """The operation's own seconds and memory, and the whole process's wall time around it."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURE, action, str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{action} failed: {done.stderr[-2000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_seconds": time.perf_counter() - started}


def main(size: int = GIB) -> dict:
    from storage.embedded import start_weed

    with tempfile.TemporaryDirectory(dir=os.environ.get("MNIST_BENCH_TMP")) as scratch:
        root = Path(scratch)
        model = root / "model" / "1"
        make_large_saved_model(model, size)
        variable_bytes = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
        weed = start_weed(root / "s3", "bench", "bench-secret-key")
        env = {**os.environ, "MNIST_S3_ENDPOINT": weed.endpoint, "AWS_ACCESS_KEY_ID": "bench",
               "AWS_SECRET_ACCESS_KEY": "bench-secret-key", "AWS_REGION": "us-east-1", "PYTHONPATH": str(REPO)}
        try:
            results = {"publish": measure("publish", model, env), "verify": measure("verify", model, env),
                       "sync": measure("sync", root / "synced" / "mnist", env)}
        finally:
            weed.stop()
    rows = [[action, round(r["seconds"], 1), round(r["process_seconds"], 1), round(r["baseline_mib"]),
             round(r["peak_mib"]), round(r["peak_mib"] - r["baseline_mib"])] for action, r in results.items()]
    print(f"SavedModel of {variable_bytes / GIB:.2f} GiB")
    print(table(["operation", "seconds", "whole process s", "baseline RSS MiB", "peak RSS MiB",
                 "peak above baseline MiB"], rows))
    result = {"model_bytes": variable_bytes, **results}
    print(f"results: {save('transfers', result)}")
    return result
