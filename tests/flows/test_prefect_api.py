"""The temporary Prefect API a command starts when none is configured, and only then."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import REPO

FIRST_RUN = """
import httpx
from flows.prefect_api import early_prefect_api
with early_prefect_api() as ready:
    ready()
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY
    from prefect.utilities.urls import url_for
    url = PREFECT_API_URL.value()
    link = url_for("flow-run", obj_id="00000000-0000-0000-0000-000000000000")  # what "View at" would print
    print(url, httpx.get(url + "/health", timeout=5).status_code, PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value(), link,
          flush=True)
print(url)
"""


def port_open(url: str) -> bool:
    address = urlsplit(url)
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((address.hostname, address.port)) == 0


def test_a_first_run_gets_a_temporary_api_that_answers_and_is_gone_after(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path)  # no profile that names an API
    result = subprocess.run([sys.executable, "-c", FIRST_RUN], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    inside, after = result.stdout.splitlines()
    url, status, heartbeat, link = inside.split()
    assert url.startswith("http://127.0.0.1:") and status == "200"
    assert heartbeat == "None"  # nothing outlives this server to watch them, and each costs a flow up to 1 s
    assert link == "None"  # no "View at" link to a UI that is gone by the time the run's answers print
    assert not port_open(after)


def test_a_configured_api_starts_no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import flows.prefect_api as prefect_api

    def refuse(port: int):
        raise AssertionError("a server was spawned although an API is configured")

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(prefect_api, "spawn_server", refuse)
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # as a profile or harness sets it
        with prefect_api.early_prefect_api() as ready:
            ready()
            assert PREFECT_API_URL.value() == "http://127.0.0.1:9/api"


def test_a_temporary_server_that_dies_is_said_by_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import flows.prefect_api as prefect_api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(prefect_api, "spawn_server", lambda port: subprocess.Popen(
        [sys.executable, "-c", "raise SystemExit(3)"], start_new_session=True))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # whatever API an earlier test set
        with pytest.raises(RuntimeError, match="exited with code 3"):
            with prefect_api.early_prefect_api() as ready:
                ready()


KILLED_RUN = """
import time
from flows.prefect_api import early_prefect_api
with early_prefect_api() as ready:
    ready()
    print("ready", flush=True)
    time.sleep(600)
"""


def test_a_killed_command_leaves_no_temporary_server(tmp_path) -> None:
    from storage.embedded import descendants, process_alive

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    command = subprocess.Popen([sys.executable, "-c", KILLED_RUN], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert command.stdout.readline().strip() == "ready"
        [server] = [pid for pid in descendants(command.pid)
                    if b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        command.kill()
        command.wait(timeout=10)
        deadline = time.monotonic() + 20
        while process_alive(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not process_alive(server), "the temporary Prefect server outlived its command"
    finally:
        if command.poll() is None:
            command.kill()
        command.stdout.close()
