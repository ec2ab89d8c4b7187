"""``mnist up`` (make serve): the serving stack comes up on the store, serves what gets published
through the gateway, says where it is, and stops on SIGTERM leaving no process behind."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from mnist_client.client import Target, predict, wait_until_available
from storage.embedded import LOWEST_PICKED_PORT, ephemeral_ports, free_port, port_free
from tasks.data import load_test_set
from tasks.publish import publish_model
from tests.conftest import REPO, stack_addresses, stopped_by_sigterm


def test_make_serve_restarts_a_part_that_dies_and_says_so(store, saved_model_dir: Path, tmp_path: Path) -> None:
    """SIGKILL of the gateway: mnist up says so and restarts it on the same port, with a back-off
    capped at a minute and no limit (serving.stack.backoff); the restarted gateway counts what the
    kill lost (its ledger)."""
    import psutil

    from serving.stack import backoff

    assert [backoff(n) for n in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    publish_model(store, saved_model_dir, {"test_accuracy": 0.5, "test_loss": 1.0, "per_class_accuracy": [0.5] * 10},
                  {}, "stable")
    state = tmp_path / "state"
    process = subprocess.Popen([sys.executable, "-m", "cli", "up", "--port", "0", "--rest-api-port", "0"],
                               cwd=REPO, env={**os.environ, "MNIST_STATE_DIR": str(state)}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []

    def read_until(text: str) -> None:
        while not any(text in line for line in lines):
            line = process.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)

    try:
        read_until("export MNIST_SERVING_ADDRESS=")
        gateway = next(line for line in lines if "export MNIST_SERVING_ADDRESS=" in line).split("=", 1)[1].strip()
        assert wait_until_available(Target(gateway), [1], 120) == {1: "AVAILABLE"}
        [first] = [child for child in psutil.Process(process.pid).children(recursive=True)
                   if "gateway" in child.cmdline()]
        first.kill()
        read_until("the gateway restarted")
        assert any("the gateway exited (code -9); restarting it in 1 s" in line for line in lines), "".join(lines)
        assert wait_until_available(Target(gateway), [1], 60) == {1: "AVAILABLE"}  # the same address serves again
    finally:
        output = stopped_by_sigterm(process)
    assert process.returncode == 0 and "mnist up: stopped" in output, "".join(lines) + output
    assert not first.is_running() and "listening on" in (state / "serving" / "gateway.log").read_text()


def test_the_supervisor_never_gives_up_on_a_part(tmp_path: Path, monkeypatch) -> None:
    """A part that dies at once, again and again, is restarted for as long as the stack lives, each
    restart said in one line, and past RESTART_LIMIT restarts the line says it crash-loops (a
    stack used to stop restarting a part after RESTART_LIMIT: freeing a full disk then mended nothing)."""
    import serving.stack
    from serving.stack import Part, Supervisor

    monkeypatch.setattr(serving.stack, "MAX_BACKOFF", 0.1)  # the waits, not the restarts, are shortened
    monkeypatch.setattr(serving.stack, "RESTART_LIMIT", 1)
    said: list[str] = []
    supervisor = Supervisor(said.append)
    supervisor.start(Part("sync sidecar", ["sync", "--no-such-flag"], tmp_path / "sync.log"))  # exits 2 at once
    supervisor.thread.start()
    try:
        deadline = time.monotonic() + 30
        while sum("restarted" in line for line in said) < 4:
            assert time.monotonic() < deadline, said
            time.sleep(0.1)
    finally:
        supervisor.stop()
    exits = [line for line in said if "exited" in line]
    assert all(line.startswith("mnist up: the sync sidecar exited (code 2); restarting it in 0.1 s")
               for line in exits), said
    assert "died 2 times in 10 minutes: see" in exits[1] and "died" not in exits[0], said
    assert not any("not restarting" in line for line in said)


def test_make_serve_comes_up_serves_what_is_published_and_stops_clean(store, saved_model_dir: Path, tmp_path: Path,
                                                                      prepared_path: Path) -> None:
    state = tmp_path / "state"
    process = subprocess.Popen([sys.executable, "-m", "cli", "up", "--port", "0", "--rest-api-port", "0"],
                               cwd=REPO, env={**os.environ, "MNIST_STATE_DIR": str(state)}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        gateway, rest = stack_addresses(process, lines)
        assert httpx.get(f"{rest}/v1/models/mnist/ready").status_code == 503  # nothing published yet
        publish_model(store, saved_model_dir, {"test_accuracy": 0.5, "test_loss": 1.0,
                                               "per_class_accuracy": [0.5] * 10}, {}, "stable")
        assert wait_until_available(Target(gateway), [1], 120) == {1: "AVAILABLE"}
        deadline = time.monotonic() + 60
        while httpx.get(f"{rest}/v1/models/mnist/labels/stable/ready").status_code != 200:
            assert time.monotonic() < deadline, "stable never became ready"
            time.sleep(0.5)
        images, labels = load_test_set(prepared_path)
        answers = predict(images[:20], address=gateway, label="stable")
        assert np.mean([a["digit"] for a in answers] == labels[:20]) > 0.5 and answers[0]["request_id"]
        assert (state / "serving" / "stack.json").is_file()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stdout.close()
    assert process.returncode == 0, "".join(lines) + output
    assert "mnist up: stopped" in output and not (state / "serving" / "stack.json").exists()
    leftover = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True)
    assert leftover.stdout == "", "mnist up left a process running"


def test_free_ports_come_from_below_the_ephemeral_range_and_are_free() -> None:
    """An outgoing connection can take an ephemeral port between the pick and the bind; none of
    these can be taken so."""
    low, _ = ephemeral_ports()
    picks = []
    for _ in range(2):
        random.seed(0)  # as a seeded training run would: the picks must not follow
        picks.append([free_port() for _ in range(5)])
    assert picks[0] != picks[1]
    assert all(LOWEST_PICKED_PORT <= port < low for port in picks[0] + picks[1])
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", picks[0][0]))
        listener.listen()
        assert not port_free(picks[0][0])


def test_a_killed_stack_keeper_leaves_no_part_running(store, tmp_path: Path) -> None:
    """mnist up (or mnist run) SIGKILLed: its model server, sync and gateway, each in a session of
    its own, go with it instead of running on as orphans."""
    from storage.embedded import descendants, process_alive

    process = subprocess.Popen([sys.executable, "-m", "cli", "up", "--port", "0", "--rest-api-port", "0"],
                               cwd=REPO, env={**os.environ, "MNIST_STATE_DIR": str(tmp_path / "state")},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        while not any("export MNIST_SERVING_ADDRESS=" in line for line in lines):
            line = process.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        parts = descendants(process.pid)
        assert len(parts) >= 3
        process.kill()
        process.wait(timeout=10)
        deadline = time.monotonic() + 20
        while any(process_alive(pid) for pid in parts) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(process_alive(pid) for pid in parts), "parts outlived the killed stack"
    finally:
        for pid in descendants(process.pid) if process.poll() is None else []:
            os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
        process.stdout.close()
