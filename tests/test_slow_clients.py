"""2,000 slow-loris connections against a real `mnist serve`: each sends a header line every 3 s and
never ends its request head. The REST front must close every one within its header timeout (the
default, 10 s: this test runs unchanged against a server that has no such option), answer an honest
client about as fast as unloaded, take a new connection meanwhile, and stop on SIGTERM within 5 s."""

from __future__ import annotations

import os
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from storage.embedded import free_port, stop_process
from tests.test_serve_command import serve_in_process_group

pytestmark = pytest.mark.faults

SLOW = 2000
HEADER_TIMEOUT = 10.0  # the server's default
LINE_EVERY = 3.0
CLOSE_SLACK = 2.0  # past the timeout: the server's timer, the loop here, a loaded machine
STOP_WITHIN = 5.0


def raise_open_files_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"{SLOW} connections need {needed} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class SlowLoris:
    """``count`` connections that open a request head and send one more header line every
    ``LINE_EVERY`` seconds, never its end; records when the server closed each."""

    def __init__(self, port: int, count: int):
        self.opened: list[float] = []
        self.closed: dict[int, float] = {}
        self.lines: dict[int, int] = {}
        self.sockets: list[socket.socket] = []
        for index in range(count):
            connection = socket.create_connection(("127.0.0.1", port), timeout=10)
            connection.sendall(b"POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\n")
            connection.setblocking(False)
            self.sockets.append(connection)
            self.opened.append(time.monotonic())
            self.lines[index] = 1
        self.selector = selectors.DefaultSelector()
        for index, connection in enumerate(self.sockets):
            self.selector.register(connection, selectors.EVENT_READ, index)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def start(self) -> "SlowLoris":
        self.thread.start()
        return self

    def mark_closed(self, index: int) -> None:
        if index not in self.closed:
            self.closed[index] = time.monotonic()
            self.selector.unregister(self.sockets[index])

    def run(self) -> None:
        next_line = time.monotonic() + LINE_EVERY
        while not self.stop.is_set() and len(self.closed) < len(self.sockets):
            for key, _ in self.selector.select(timeout=max(0.0, min(0.2, next_line - time.monotonic()))):
                try:
                    data = key.fileobj.recv(4096)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.mark_closed(key.data)
            if time.monotonic() >= next_line:
                next_line += LINE_EVERY
                for index, connection in enumerate(self.sockets):
                    if index in self.closed:
                        continue
                    try:
                        connection.send(b"X-Slow-%d: %d\r\n" % (index, self.lines[index]))
                        self.lines[index] += 1
                    except BlockingIOError:
                        pass
                    except OSError:
                        self.mark_closed(index)

    def close(self) -> None:
        self.stop.set()
        if self.thread.ident is not None:
            self.thread.join(timeout=10)
        self.selector.close()
        for connection in self.sockets:
            connection.close()


def latencies_ms(client: httpx.Client, url: str, body: bytes, calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        client.post(url, content=body).raise_for_status()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def test_slow_loris_connections_are_closed_while_an_honest_client_is_answered_and_sigterm_stops(
        model_base: Path) -> None:
    raise_open_files_limit(2 * SLOW + 512)
    rest_port = free_port()
    process, lines = serve_in_process_group("--port", str(free_port()), "--rest_api_port", str(rest_port),
                                            "--model_base_path", str(model_base))
    assert "listening on" in lines[-1], "".join(lines)
    url = f"http://127.0.0.1:{rest_port}/v1/models/mnist:predict"
    body = ('{"instances": [' + str([[[0.5]] * 28] * 28) + "]}").encode()
    slow: SlowLoris | None = None
    stop_seconds = None
    try:
        with httpx.Client(timeout=30) as honest:
            latencies_ms(honest, url, body, 20)  # warm
            unloaded = statistics.median(latencies_ms(honest, url, body, 200))
            slow = SlowLoris(rest_port, SLOW).start()
            loaded = statistics.median(latencies_ms(honest, url, body, 200))
            fresh = httpx.post(url, content=body, timeout=10)  # a new connection beside the 2,000
            slow.thread.join(timeout=HEADER_TIMEOUT + 2 * LINE_EVERY + CLOSE_SLACK + 5)
        held = [slow.closed.get(index, time.monotonic()) - opened for index, opened in enumerate(slow.opened)]
        open_after = SLOW - len(slow.closed)
        most_lines = max(slow.lines.values())
        slow.close()
        # a second flood, open as SIGTERM arrives
        slow = SlowLoris(rest_port, SLOW)
        started = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_WITHIN + 5)
        except subprocess.TimeoutExpired:
            pass
        stop_seconds = time.monotonic() - started
    finally:
        if slow is not None:
            slow.close()
        if process.poll() is None:
            stop_process(process.pid)
            process.wait(timeout=30)
        process.stdout.close()
    print(f"unloaded p50 {unloaded:.2f} ms, with {SLOW} slow connections {loaded:.2f} ms; slowest close "
          f"{max(held):.1f} s; stop {stop_seconds:.2f} s")
    assert fresh.status_code == 200, fresh.text
    assert open_after == 0, f"{open_after} of {SLOW} slow connections still open"
    assert most_lines >= 3  # each kept sending: a line every few seconds does not keep a connection
    assert max(held) <= HEADER_TIMEOUT + CLOSE_SLACK, f"a slow connection was held {max(held):.1f} s"
    assert loaded <= 2 * unloaded + 3, f"p50 {loaded:.2f} ms with {SLOW} slow connections, {unloaded:.2f} unloaded"
    assert stop_seconds is not None and stop_seconds <= STOP_WITHIN, f"SIGTERM took {stop_seconds:.1f} s"
