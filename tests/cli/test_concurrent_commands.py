"""Commands started at the same second on a fresh checkout share what they start (the embedded
store, the Prefect database) instead of failing beside each other."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from storage.embedded import process_alive, read_state
from tests.conftest import REPO


def started_together(commands: list[list[str]], env: dict[str, str], cwd: Path, timeout: float
                     ) -> list[subprocess.CompletedProcess[str]]:
    """Each ``mnist`` command in its own process, all started at once; their results in order."""
    processes = [subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=cwd, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for args in commands]
    results = []
    for args, process in zip(commands, processes, strict=True):
        output, _ = process.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(args, process.returncode, output))
    return results


def fresh_environment(tmp_path: Path) -> dict[str, str]:
    """A state dir and a Prefect home no command has used; no store or API configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MNIST_S3", "PREFECT_API", "PREFECT_HOME"))}
    return {**env, "MNIST_STATE_DIR": str(tmp_path / "state"), "PYTHONPATH": str(REPO)}


def test_commands_at_once_share_one_embedded_store_and_the_last_stops_it(tmp_path: Path) -> None:
    env = fresh_environment(tmp_path)
    results = started_together([["registry", "list"]] * 3, env, tmp_path, timeout=120)
    for result in results:
        assert result.returncode == 0, result.stdout[-1500:]
    state = tmp_path / "state"
    recorded = read_state(state)  # None once its process is gone
    assert recorded is None, f"the store the commands started still runs (pid {recorded.pid})"
    assert not any(process_alive(int(pid)) for pid in pids_started_in(tmp_path))


def pids_started_in(tmp_path: Path) -> list[str]:
    """Processes whose command line names the test's directory (a store left running would)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(tmp_path) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(proc.name)
            except OSError:
                continue
    return found


def test_a_store_a_person_started_is_not_stopped_by_the_commands_that_used_it(tmp_path: Path) -> None:
    env = fresh_environment(tmp_path)
    state = tmp_path / "state"
    up = subprocess.run([sys.executable, "-m", "cli", "storage", "up"], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=120)
    assert up.returncode == 0, up.stderr[-1500:]
    try:
        results = started_together([["registry", "list"]] * 2, env, tmp_path, timeout=120)
        assert all(result.returncode == 0 for result in results), [r.stdout[-800:] for r in results]
        assert read_state(state) is not None  # still running
    finally:
        subprocess.run([sys.executable, "-m", "cli", "storage", "down"], cwd=tmp_path, env=env, timeout=60)
    assert read_state(state) is None


@pytest.mark.faults
def test_two_first_runs_at_once_both_succeed(tmp_path: Path, mnist_dir: Path) -> None:
    """make run twice at the same second on a fresh checkout: one waits for the other's chain, and
    both their Prefect servers migrate one fresh database in turn."""
    env = {**fresh_environment(tmp_path), "MNIST_DATA_DIR": str(mnist_dir),
           "MNIST_CACHE_DIR": str(tmp_path / "cache")}
    run = ["run", "--preset", "smoke", "--threshold", "0.5"]
    results = started_together([run, run], env, tmp_path, timeout=900)
    for result in results:
        assert result.returncode == 0, result.stdout[-2500:]
        assert "correct" in result.stdout
    assert any("waiting for the other mnist run" in result.stdout for result in results)
    assert (tmp_path / "state" / "prefect" / "prefect.db").exists()  # the project's home, not ~/.prefect
    assert read_state(tmp_path / "state") is None
