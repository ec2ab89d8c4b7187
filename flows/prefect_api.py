"""A temporary Prefect API for one command, started as early as possible.

Without PREFECT_API_URL, a flow run makes Prefect start a temporary server and waits for it,
after the command has imported TensorFlow: seconds of a person's wait spent one after the other.
This starts the same server (the same uvicorn command Prefect's SubprocessASGIServer runs) in
its own process first, so it comes up while TensorFlow imports; the flow finds it ready.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

from storage import settings
from storage.embedded import PARENT_VARIABLE, exclusive_lock, free_port, stop_process
from storage.errors import MnistError

# What SubprocessASGIServer sets for its server: no UI, an ephemeral database lifecycle.
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
# A server that lives for one command serves no block documents and registers no block types: skipping
# that (and the import of every installed Prefect collection it starts with) is ~2 s of its start.
# Nor does it phone home unless asked to (offline, that is an error line on the terminal).
SERVER_DEFAULTS = {"PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "false",
                   "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false",
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
STARTUP_TIMEOUT = 120.0


def api_status(api_url: str, method: str, path: str, body: bytes | None = None) -> int:
    """One request to the temporary API: http.client, as httpx builds an SSL context per call
    (~40 ms of CPU, taken from the imports this overlaps with)."""
    address = urlsplit(api_url)
    connection = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port, timeout=5)
    try:
        connection.request(method, f"{address.path}{path}", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def wait_healthy(api_url: str, process: subprocess.Popen, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the temporary Prefect server exited with code {process.returncode}")
        try:
            if api_status(api_url, "GET", "/health") == 200:
                return
        except OSError:  # not listening yet
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:.0f}s")


class ApiUnreachable(MnistError, RuntimeError):
    """The configured Prefect API did not answer within the wait."""

    status = "UNAVAILABLE"


def wait_for_api(api_url: str, timeout: float, say: Callable[[str], None] = print) -> None:
    """Wait up to ``timeout`` seconds for the Prefect API at ``api_url`` to answer its health
    check (a server just started takes seconds), saying once that it waits; raise ApiUnreachable
    naming the URL when it gives up."""
    deadline, said = time.monotonic() + timeout, False
    while True:
        try:
            if api_status(api_url, "GET", "/health") == 200:
                return
            problem = "it answers, but not as a Prefect API"
        except OSError as error:
            problem = f"{error.strerror or error}"
        if time.monotonic() >= deadline:
            raise ApiUnreachable(f"the Prefect API at {api_url} did not answer within {timeout:.0f} s ({problem});"
                                 " start it with make prefect, or set PREFECT_API_URL")
        if not said:
            say(f"waiting up to {timeout:.0f} s for the Prefect API at {api_url} ({problem})")
            said = True
        time.sleep(0.5)


def warm_up(api_url: str) -> None:
    """Make the server do now, while this process imports, the work it defers to its first requests.

    FastAPI builds each router's routes on the first request that looks through it (a path no route
    matches looks through all of them), and SQLAlchemy prepares a query on its first use: ~0.8 s
    the flow run's first calls would otherwise wait for."""
    try:
        api_status(api_url, "GET", "/no-such-route")
        api_status(api_url, "POST", "/flow_runs/filter", b'{"limit": 1}')
    except OSError:  # only a head start: the flow's own calls meet any real problem and say it
        pass


def start_in_background(api_url: str, start: Callable[[], subprocess.Popen], until: threading.Event
                        ) -> Callable[[], None]:
    """Start the server, wait for it and warm it up in a thread; returns the wait for that (raising
    its error). ``start`` runs in the thread: it may wait for another command's server to come up.
    The thread then lives until ``until`` is set: the server dies with the thread that started it
    (``die_with_parent``), so a killed command leaves no server behind."""
    failure: list[Exception] = []
    done = threading.Event()

    def healthy_and_warm() -> None:
        try:
            # A server migrates its SQLite database as it starts, and two migrating one database at once
            # fail (duplicate column name): a second command waits for the first one's server to be up.
            with exclusive_lock(prefect_home() / "server-start.lock"):
                wait_healthy(api_url, start())
            warm_up(api_url)
        except Exception as error:  # said by the wait, in the thread that runs the flow
            failure.append(error)
        finally:
            done.set()
        until.wait()

    thread = threading.Thread(target=healthy_and_warm, name="prefect-api-start", daemon=True)
    thread.start()

    def ready() -> None:
        done.wait()
        if failure:
            raise failure[0]

    return ready


def prefect_home() -> Path:
    """Where Prefect keeps its database and profiles: PREFECT_HOME, else Prefect's own default."""
    return settings.prefect_home() or (Path.home() / ".prefect")


def project_prefect_home(state_dir: Path) -> None:
    """Keep the project's Prefect state in the project (``<state>/prefect``) unless the user has
    chosen a home or an API: ``~/.prefect`` is shared with every other Prefect project of the user."""
    if not settings.prefect_home_or_api_chosen():
        home = (state_dir / "prefect").absolute()
        home.mkdir(parents=True, exist_ok=True)  # Prefect makes its home, but not the folders above it
        os.environ["PREFECT_HOME"] = str(home)


@contextmanager
def early_prefect_api() -> Iterator[Callable[[], None]]:
    """A temporary Prefect API for the block (unless one is configured); yields the wait for it."""
    if api_configured():
        yield lambda: None
        return
    # Started before importing Prefect (a second of its own): the server's start is the longer wait.
    port, leaving, ended = free_port(), threading.Lock(), threading.Event()
    started: list[subprocess.Popen] | None = []

    def start() -> subprocess.Popen:
        with leaving:  # not once the block is left: a server spawned then would outlive the command
            if started is None:
                raise RuntimeError("the command ended before its Prefect server started")
            process = spawn_server(port)
            started.append(process)
        return process

    api_url = f"http://127.0.0.1:{port}/api"
    ready = start_in_background(api_url, start, ended)
    try:
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
            PREFECT_UI_URL,
            temporary_settings,
        )

        if PREFECT_API_URL.value():  # set in a Prefect profile or prefect.toml rather than the environment
            yield lambda: None
            return
        # Heartbeats let a server that outlives a run see it crash; this one ends with the command, and
        # the heartbeat thread, sleeping in 1 s steps, is joined at every flow run's end. No UI URL: a
        # "View at" link to this API would be dead by the time a person reads it.
        with temporary_settings(updates={PREFECT_API_URL: api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
                                         PREFECT_UI_URL: ""}):
            yield ready
            drain_to_api()
    finally:
        with leaving:
            spawned, started = started, None
        for server in spawned or []:
            stop_process(server.pid)
            server.wait(timeout=30)
        ended.set()


def api_configured() -> bool:
    """Whether an API is set, as far as can be told without importing Prefect (a second of its own)."""
    if settings.prefect_api_url():
        return True
    if "prefect.settings" in sys.modules:  # already imported (a test harness, a nested run): asking is free
        from prefect.settings import PREFECT_API_URL

        return bool(PREFECT_API_URL.value())
    return False  # a profile may still set one: checked once Prefect is imported


# python -m uvicorn, after asking to die with the thread that started it (storage.embedded.die_with_parent)
UVICORN_DYING_WITH_PARENT = ("import runpy, sys; from storage.embedded import die_with_parent; die_with_parent(); "
                             "sys.argv[0] = 'uvicorn'; "
                             "runpy.run_module('uvicorn', run_name='__main__', alter_sys=True)")


def spawn_server(port: int) -> subprocess.Popen:
    spec = importlib.util.find_spec("prefect")  # found, not imported: that is seconds of this process's start
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("prefect is not installed: the Prefect API comes with the [trainer] install")
    prefect_root = Path(spec.submodule_search_locations[0]).parent
    return subprocess.Popen(
        [sys.executable, "-c", UVICORN_DYING_WITH_PARENT, "--app-dir", str(prefect_root), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "error", "--lifespan", "on"],
        env={**SERVER_DEFAULTS, **settings.child_environment({**SERVER_ENV, PARENT_VARIABLE: str(os.getpid())})},
        stdin=subprocess.DEVNULL, start_new_session=True)


def drain_to_api(timeout: float = 10.0) -> None:
    """Deliver the logs and events still queued before the server goes (else Prefect retries at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


def end_runs_of(pool: str, pids: set[int], reason: str) -> list[str]:
    """Runs of ``pool`` still Running (or Cancelling) whose process was one of ``pids``, all gone now:
    set Crashed (Cancelled for a cancel under way) with ``reason``, which frees their concurrency
    slots now rather than when the zombie automation notices. Returns their names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled, Crashed

    live = [StateType.RUNNING, StateType.PENDING, StateType.CANCELLING]
    ended = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=live))),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])))
        for run in runs:
            pid = (run.infrastructure_pid or "").rpartition(":")[2]
            if pid.isdigit() and int(pid) in pids:
                final = Cancelled if run.state and run.state.type == StateType.CANCELLING else Crashed
                client.set_flow_run_state(run.id, final(message=reason), force=True)
                ended.append(run.name)
    return ended
