"""The local serving stack, as production runs it, in processes of its own: the model server
(gRPC and REST, metrics on), the sync sidecar feeding it from the store, and the logging gateway
clients call. ``mnist up`` (``make serve``) keeps it running; ``mnist run`` starts it for one
run. While it runs, ``<state>/serving/stack.json`` says where it is, so a training run (on the
CLI or through ``make worker``) live-checks what it publishes against it."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from storage.embedded import PARENT_VARIABLE, free_port, port_free, process_alive, stop_process
from storage.errors import MnistError
from storage.settings import PipelineSettings, child_environment

MONITORING_CONFIG = Path(__file__).resolve().parent / "deploy" / "monitoring.config"


class StackError(MnistError, RuntimeError):
    """A part of the stack did not start."""


@dataclass(frozen=True)
class StackPorts:
    """Ports on 127.0.0.1; 0 picks a free one."""

    gateway: int = 0
    gateway_rest: int = 0
    server: int = 0
    server_rest: int = 0


@dataclass(frozen=True)
class Stack:
    gateway: str  # HOST:PORT clients call (gRPC)
    gateway_rest: str  # TF Serving's REST API through the gateway, feedback, metrics, readiness
    server: str  # the model server itself (gRPC), for the sync and checks
    server_rest: str
    model_dir: str
    logs: str  # where each process logs
    pid: int  # the process that keeps the stack


def local_feedback_tokens(root: Path) -> Path:
    """The local stack's token file: one trusted caller, ``local`` (whoever runs ``mnist up`` is its
    operator), made once with mode 0600. Add lines for other callers; they are untrusted unless marked."""
    path = root / "feedback-tokens"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text("# NAME TOKEN [trusted]: who may POST /v1/models/NAME/feedback "
                        "(mnist gateway --feedback-tokens)\n"
                        f"local {secrets.token_urlsafe(24)} trusted\n")
    return path


def stack_file(state_dir: Path) -> Path:
    return state_dir / "serving" / "stack.json"


def running_stack(state_dir: Path) -> Stack | None:
    """The stack recorded in ``state_dir``, if the process keeping it still runs."""
    path = stack_file(state_dir)
    try:
        stack = Stack(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return stack if process_alive(stack.pid) else None

def live_check_address(settings: PipelineSettings) -> tuple[str | None, str]:
    """Where a run live-checks what it publishes, and why there: MNIST_SERVING_ADDRESS, else the
    gateway of a running ``mnist up`` stack (``make serve``); else None and the reason to say."""
    if settings.serving_address:
        return settings.serving_address, "MNIST_SERVING_ADDRESS"
    stack = running_stack(settings.state_dir)
    if stack:
        return stack.gateway, f"the serving stack of {settings.state_dir} (mnist up)"
    return None, ("live check skipped: no server to check (MNIST_SERVING_ADDRESS is not set and no mnist up / "
                  "make serve stack runs), so the published version is not known to serve")



def wait_for_log(process: subprocess.Popen, log_path: Path, ready_text: str, name: str,
                 timeout: float = 180.0) -> None:
    """Until the process's log shows ``ready_text``; StackError if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while ready_text not in (log := log_path.read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            last = next((line for line in reversed(log.splitlines()) if line.strip()), "")
            raise StackError(f"mnist {name} did not start (exit {process.poll()}): {last[:300]}; see {log_path}")
        time.sleep(0.2)


# A part is restarted for as long as the stack lives, after 1, 2, 4 ... MAX_BACKOFF seconds: a part
# that dies of something outside it (a full disk, a store outage) comes back once that passes.
# RESTART_LIMIT restarts within RESTART_WINDOW make a crash loop, which each restart line then says;
# a part that ran RESTART_WINDOW without dying starts again from the shortest wait.
RESTART_LIMIT = 5
RESTART_WINDOW = 600.0
MAX_BACKOFF = 60.0


@dataclass
class Part:
    """One process of the stack: ``mnist ARGS``, logging to ``log_path``."""

    name: str
    args: list[str]
    log_path: Path
    process: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)  # monotonic times of recent restarts

    def start(self) -> subprocess.Popen:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as log:  # a restart goes on in the same log
            self.process = subprocess.Popen([sys.executable, "-m", "cli", *self.args], stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True,
                                            env=child_environment({PARENT_VARIABLE: str(os.getpid())}))
        return self.process

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process.pid)
            self.process.wait(timeout=30)


def backoff(restarts_in_window: int) -> float:
    """Seconds to wait before the next restart: doubling with each recent restart, capped at MAX_BACKOFF."""
    return min(MAX_BACKOFF, 2.0 ** restarts_in_window)


def restart_line(part: Part, delay: float) -> str:
    """What a restart says, in one line; past RESTART_LIMIT recent restarts, that the part crash-loops."""
    recent = len(part.restarts)
    looping = (f"; it died {recent + 1} times in {RESTART_WINDOW / 60:g} minutes: see {part.log_path}"
               if recent >= RESTART_LIMIT else "")
    return (f"mnist up: the {part.name} exited (code {part.process.returncode if part.process else None}); "
            f"restarting it in {delay:g} s{looping}")


class Supervisor:
    """The stack's parts, each restarted with a capped back-off whenever it dies on its own, for as
    long as the stack lives, and every restart said on ``say``; stopped last-started first (the
    gateway before the server, so it writes its queued logs)."""

    def __init__(self, say: Callable[[str], None]):
        self.parts: list[Part] = []
        self.say = say
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.watch, name="stack-supervisor", daemon=True)

    def start(self, part: Part) -> subprocess.Popen:
        self.parts.append(part)
        return part.start()

    def watch(self) -> None:
        pending: dict[str, float] = {}  # part name -> when its restart is due
        while not self.stopping.wait(0.5):
            now = time.monotonic()
            for part in self.parts:
                if part.process is None or part.process.poll() is None:
                    continue
                if part.name not in pending:
                    part.restarts = [t for t in part.restarts if now - t < RESTART_WINDOW]
                    delay = backoff(len(part.restarts))
                    self.say(restart_line(part, delay))
                    pending[part.name] = now + delay
                elif now >= pending[part.name] and not self.stopping.is_set():
                    del pending[part.name]
                    part.restarts.append(now)
                    try:
                        part.start()
                    except OSError as error:  # e.g. its log's disk is full: try again after the next wait
                        self.say(f"mnist up: cannot restart the {part.name}: {error}")
                        continue
                    self.say(f"mnist up: the {part.name} restarted (pid {part.process.pid})")

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        for part in reversed(self.parts):
            part.stop()


@contextmanager
def serving_stack(state_dir: Path, ports: StackPorts = StackPorts(), sample_rate: float = 1.0,
                  sync_interval: float = 1.0, wait: bool = True, supervise: bool = False,
                  say: Callable[[str], None] = print) -> Iterator[tuple[Stack, Callable[[], None]]]:
    """Start server, sync and gateway on the store the environment names; yield where they are and
    a wait until the server and the gateway listen (already waited for, unless ``wait`` is False:
    a training run can go on while they start); with ``supervise``, restart a part that dies
    (``Supervisor``), saying so on ``say``; stop them, the gateway first, flushing its logs, when
    the block ends."""
    from serving.sync import SyncError, sync_once
    from storage.models import ModelStore
    from storage.settings import StoreSettings

    busy = [port for port in asdict(ports).values() if port and not port_free(port)]
    if busy:
        raise StackError(f"port {busy[0]} is in use (another server?); give 0 for a free one")
    chosen = {name: port or free_port() for name, port in asdict(ports).items()}
    root = (state_dir / "serving").resolve()
    store = ModelStore(StoreSettings())
    store.ensure_bucket()
    model_dir = root / store.settings.model_name
    try:
        sync_once(store, model_dir)  # the server starts on what is already published
    except SyncError as error:  # the sync sidecar tries again, with a backoff, until it passes
        say(f"mnist up: the first sync is incomplete ({error}); the sync sidecar keeps trying")
    server = f"127.0.0.1:{chosen['server']}"
    for name in ("serve", "sync", "gateway"):
        (root / f"{name}.log").unlink(missing_ok=True)  # each stack's logs start fresh; a restart appends
    parts = Supervisor(say)
    try:
        serve = parts.start(Part("model server", [
            "serve", "--port", str(chosen["server"]), "--rest-api-port", str(chosen["server_rest"]),
            "--model-config-file", str(root / "models.config"), "--monitoring-config-file", str(MONITORING_CONFIG),
            "--model-config-file-poll-wait-seconds", "1",  # as production's 10, shorter: the sync runs every second
            "--allow-version-labels-for-unavailable-models"],  # restarts on a config with labels, as in production
            root / "serve.log"))
        parts.start(Part("sync sidecar", [
            "sync", "--model-base-path", str(model_dir), "--watch", "--interval", str(sync_interval),
            "--server", server], root / "sync.log"))
        gateway = parts.start(Part("gateway", [
            "gateway", "--upstream", server, "--upstream-rest", f"127.0.0.1:{chosen['server_rest']}",
            "--port", str(chosen["gateway"]), "--rest-api-port", str(chosen["gateway_rest"]),
            "--log-sample-rate", str(sample_rate), "--log-flush-seconds", "1",
            "--feedback-tokens", str(local_feedback_tokens(root)), "--log-ledger", str(root / "gateway-ledger.json"),
            "--log-spool", str(root / "gateway-spool")],
            root / "gateway.log"))

        def ready() -> None:
            wait_for_log(serve, root / "serve.log", "listening on", "serve")
            wait_for_log(gateway, root / "gateway.log", "listening on", "gateway")

        if wait:
            ready()
        if supervise:
            parts.thread.start()
        stack = Stack(f"127.0.0.1:{chosen['gateway']}", f"127.0.0.1:{chosen['gateway_rest']}", server,
                      f"127.0.0.1:{chosen['server_rest']}", str(model_dir), str(root), os.getpid())
        stack_file(state_dir).write_text(json.dumps(asdict(stack)))
        try:
            yield stack, ready
        finally:
            stack_file(state_dir).unlink(missing_ok=True)
    finally:
        parts.stop()
