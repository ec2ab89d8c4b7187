"""The sidecars as production installs them: the project without extras (what the sidecar image
installs) against the [trainer] install (the trainer image), each in a fresh virtual environment.
Prints each install's size, whether TensorFlow and Prefect are importable in it, and the start time
and memory of `mnist sync` (one pass against an empty bucket, the whole process) and of
`mnist gateway` (from the command to its "listening" line) in each."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import venv
from pathlib import Path

from bench.common import save, table
from bench.light_client import site_packages_mib

REPO = Path(__file__).resolve().parents[1]
INSTALLS = {"sidecar (no extras)": [str(REPO / "clients/python"), str(REPO)],
            "trainer ([trainer])": [f"{REPO / 'clients/python'}[images]", f"{REPO}[trainer]"]}


def install(environment: Path, specs: list[str]) -> float:
    """pip install into a fresh venv; the seconds it took."""
    venv.create(environment, with_pip=True)
    started = time.perf_counter()
    subprocess.run([str(environment / "bin" / "python"), "-m", "pip", "install", "--quiet", *specs],
                   check=True, capture_output=True)
    return time.perf_counter() - started


def importable(environment: Path, module: str) -> bool:
    return subprocess.run([str(environment / "bin" / "python"), "-c", f"import {module}"],
                          capture_output=True).returncode == 0


def sync_once(environment: Path, env: dict[str, str], scratch: Path) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of a whole `mnist sync` pass."""
    started = time.perf_counter()
    process = subprocess.Popen([str(environment / "bin" / "mnist"), "sync", "--model-base-path",
                                str(scratch / "models" / "mnist")], env=env, cwd=scratch,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    errors = process.stderr.read().decode()
    process.stderr.close()
    if process.returncode != 0:
        raise RuntimeError(f"mnist sync failed: {errors}")
    return seconds, usage.ru_maxrss / 1024


def gateway_start(environment: Path, env: dict[str, str], scratch: Path) -> tuple[float, float]:
    """(seconds to the listening line, resident MiB then) of `mnist gateway`."""
    from storage.embedded import free_port, stop_process

    started = time.perf_counter()
    process = subprocess.Popen([str(environment / "bin" / "mnist"), "gateway", "--upstream",
                                f"127.0.0.1:{free_port()}", "--port", str(free_port())], env=env, cwd=scratch,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()
        seconds = time.perf_counter() - started
        if "listening on" not in line:
            raise RuntimeError(f"mnist gateway did not start: {line}{process.stdout.read()}")
        status = Path(f"/proc/{process.pid}/status").read_text().splitlines()
        rss = next(int(entry.split()[1]) for entry in status if entry.startswith("VmRSS:")) / 1024
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stop_process(process.pid)
        process.stdout.close()
    return seconds, rss


def main(runs: int = 3) -> dict:
    import statistics

    from storage.embedded import start_weed

    rows, result = [], {}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        bare = scratch / "bare"
        venv.create(bare, with_pip=True)
        weed = start_weed(scratch / "store", "bench-access", "bench-secret-key-1")
        env = {**os.environ, "MNIST_S3_ENDPOINT": weed.endpoint, "MNIST_S3_BUCKET": "bench-sidecar",
               "AWS_ACCESS_KEY_ID": "bench-access", "AWS_SECRET_ACCESS_KEY": "bench-secret-key-1",
               "AWS_REGION": "us-east-1"}
        env.pop("VIRTUAL_ENV", None)
        try:
            for name, specs in INSTALLS.items():
                environment = scratch / name.split()[0]
                install_seconds = install(environment, specs)
                size = site_packages_mib(environment) - site_packages_mib(bare)
                syncs = [sync_once(environment, env, scratch) for _ in range(runs)]
                gateways = [gateway_start(environment, env, scratch) for _ in range(runs)]
                measured = {"installed_mib": size, "install_seconds": install_seconds,
                            "tensorflow_importable": importable(environment, "tensorflow"),
                            "prefect_importable": importable(environment, "prefect"),
                            "sync_seconds": statistics.median(s for s, _ in syncs),
                            "sync_peak_rss_mib": statistics.median(r for _, r in syncs),
                            "gateway_start_seconds": statistics.median(s for s, _ in gateways),
                            "gateway_rss_mib": statistics.median(r for _, r in gateways)}
                result[name] = measured
                rows.append([name, round(size, 1), round(install_seconds, 1),
                             "yes" if measured["tensorflow_importable"] else "no",
                             "yes" if measured["prefect_importable"] else "no",
                             round(measured["sync_seconds"], 2), round(measured["sync_peak_rss_mib"], 1),
                             round(measured["gateway_start_seconds"], 2), round(measured["gateway_rss_mib"], 1)])
        finally:
            weed.stop()
    print(table(["install", "MiB beyond pip", "pip s", "TensorFlow", "Prefect", "sync pass s", "sync peak MiB",
                 "gateway start s", "gateway MiB"], rows))
    print(f"(medians of {runs}; sync: one whole `mnist sync` process against an empty bucket; gateway: from the "
          "command to its listening line)")
    print(f"results: {save('sidecar', result)}")
    return result
