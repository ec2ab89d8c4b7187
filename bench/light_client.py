"""The TensorFlow-free client (clients/python) as another service gets it: installed into a
fresh virtual environment, its size, its import time and memory, and its single-image Predict
p50 against `mnist serve` (its raw stub, and its `predict()` called once per request as a
service calls it), beside the full stack's tensorflow-serving-api stubs in this one."""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
import venv
from pathlib import Path

from bench.common import save, table
from bench.serving import latency_ms, make_model, start_server

REPO = Path(__file__).resolve().parents[1]
IMPORT = ("import time; started = time.perf_counter(); import mnist_client; took = time.perf_counter() - started; "
          "from pathlib import Path; rss = next(int(l.split()[1]) for l in Path('/proc/self/status').read_text()"
          ".splitlines() if l.startswith('VmRSS:')) / 1024; print(took, rss)")
LATENCY = '''
import json, random, sys, time
from mnist_client import Target
from mnist_client.client import open_channel, image_tensor
from mnist_client.protos import predict_pb2, prediction_service_pb2_grpc
target = Target(sys.argv[1])
random.seed(1)
images = [[[[random.random()] for _ in range(28)] for _ in range(28)]]  # no numpy in this venv
with open_channel(target) as channel:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.inputs["image"].CopyFrom(image_tensor(images))
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    for _ in range(50):
        stub.Predict(request, timeout=10)
    samples = []
    for _ in range(int(sys.argv[2])):
        started = time.perf_counter()
        stub.Predict(request, timeout=10)
        samples.append((time.perf_counter() - started) * 1000)
print(json.dumps(samples))
'''

PREDICT_PER_CALL = '''
import json, random, sys, time
from mnist_client import predict
random.seed(1)
images = [[[[random.random()] for _ in range(28)] for _ in range(28)]]  # no numpy in this venv
for _ in range(50):
    predict(images, address=sys.argv[1])
samples = []
for _ in range(int(sys.argv[2])):
    started = time.perf_counter()
    predict(images, address=sys.argv[1])
    samples.append((time.perf_counter() - started) * 1000)
print(json.dumps(samples))
'''


def site_packages_mib(environment: Path) -> float:
    packages = next(environment.glob("lib/python*/site-packages"))
    return sum(p.stat().st_size for p in packages.rglob("*") if p.is_file()) / 2**20


def site_packages_mib_of(environment: Path, name: str) -> float:
    folder = next(environment.glob("lib/python*/site-packages")) / name
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20 if folder.exists() else 0.0


def main(calls: int = 2000) -> dict:
    from storage.embedded import free_port, stop_process

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        bare = root / "bare"
        venv.create(bare, with_pip=True)
        light, with_numpy, with_images = root / "light", root / "with-numpy", root / "with-images"
        for environment, spec in ((light, str(REPO / "clients/python")),
                                  (with_numpy, f"{REPO / 'clients/python'}[numpy]"),
                                  (with_images, f"{REPO / 'clients/python'}[images]")):
            venv.create(environment, with_pip=True)
            subprocess.run([str(environment / "bin" / "python"), "-m", "pip", "install", "--quiet", spec],
                           check=True, capture_output=True)
        installed = site_packages_mib(light) - site_packages_mib(bare)
        installed_numpy = site_packages_mib(with_numpy) - site_packages_mib(bare)
        installed_images = site_packages_mib(with_images) - site_packages_mib(bare)
        numpy_mib = sum(site_packages_mib_of(with_numpy, name) for name in ("numpy", "numpy.libs"))
        tensorflow_free = subprocess.run([str(light / "bin" / "python"), "-c", "import tensorflow"],
                                         capture_output=True).returncode != 0
        imports, processes = [], []
        for _ in range(5):  # the import inside the process, and the whole `python -c` process around it
            started = time.perf_counter()
            imports.append(subprocess.run([str(light / "bin" / "python"), "-c", IMPORT], capture_output=True,
                                          text=True, check=True).stdout.split())
            processes.append(time.perf_counter() - started)
        import_seconds = statistics.median(float(seconds) for seconds, _ in imports)
        import_rss = statistics.median(float(rss) for _, rss in imports)
        saved = make_model(root)
        port = free_port()
        server = start_server(saved.parent, port)
        try:
            light_samples = json.loads(subprocess.run([str(light / "bin" / "python"), "-c", LATENCY,
                                                       f"127.0.0.1:{port}", str(calls)], capture_output=True,
                                                      text=True, check=True).stdout)
            api_samples = json.loads(subprocess.run([str(light / "bin" / "python"), "-c", PREDICT_PER_CALL,
                                                     f"127.0.0.1:{port}", str(calls)], capture_output=True,
                                                    text=True, check=True).stdout)
            full_samples = latency_ms(f"127.0.0.1:{port}", calls)
        finally:
            stop_process(server.pid)
            server.wait(timeout=10)
            server.stdout.close()
    rows = [["installed size (MiB, fresh venv, beyond pip): grpcio, protobuf", round(installed, 1), "<= 76.3 (80 MB)"],
            ["installed size with [numpy]", round(installed_numpy, 1), ""],
            ["  of which numpy", round(numpy_mib, 1), ""],
            ["installed size with [images] (Pillow, numpy)", round(installed_images, 1), ""],
            ["TensorFlow importable in that venv", "no" if tensorflow_free else "yes", "no"],
            ["import mnist_client (s, median of 5)", round(import_seconds, 3), "<= 0.5"],
            ["whole `python -c 'import mnist_client'` process (s)", round(statistics.median(processes), 3), ""],
            ["resident memory after import (MiB)", round(import_rss, 1), "<= 100"],
            ["single-image Predict p50, light client without numpy (ms)", round(statistics.median(light_samples), 2),
             ""],
            ["single-image predict() p50, one call per request (ms)", round(statistics.median(api_samples), 2), ""],
            ["single-image Predict p50, tensorflow-serving-api stubs (ms)", round(statistics.median(full_samples), 2),
             ""]]
    print(table(["measure", "value", "target"], rows))
    result = {"installed_mib": installed, "installed_with_numpy_mib": installed_numpy,
              "installed_with_images_mib": installed_images, "numpy_mib": numpy_mib,
              "tensorflow_free": tensorflow_free, "import_seconds": import_seconds,
              "import_process_seconds": statistics.median(processes),
              "import_rss_mib": import_rss, "light_p50_ms": statistics.median(light_samples),
              "predict_per_call_p50_ms": statistics.median(api_samples),
              "full_stack_p50_ms": statistics.median(full_samples), "calls": calls}
    print(f"results: {save('light_client', result)}")
    return result
