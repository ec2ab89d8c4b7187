"""The small HTTP server both REST APIs answer through, on loopback."""

from __future__ import annotations

import socket
import time
from typing import Callable, Iterator

import httpx
import pytest

from serving.protocol.http import HttpLimits, HttpServer, Reply, Request, json_reply


def test_a_handler_that_fails_answers_500_and_the_connection_lives_on() -> None:
    def respond(request: Request) -> Reply:
        if request.path == "/bug":
            raise KeyError("a bug")
        return json_reply(200, {"path": request.path})

    server = HttpServer("127.0.0.1", 0, 1024, respond).start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
            failed = client.get("/bug")
            assert failed.status_code == 500 and "GET /bug" in failed.json()["error"]
            assert client.get("/fine").json() == {"path": "/fine"}  # same client, kept-alive connection
    finally:
        server.stop()


def echo(request: Request) -> Reply:
    return json_reply(200, {"path": request.path, "bytes": len(request.body)})


def serving(limits: HttpLimits, max_body_bytes: int = 1024) -> HttpServer:
    return HttpServer("127.0.0.1", 0, max_body_bytes, echo, limits=limits).start()


@pytest.fixture()
def connect() -> Iterator[Callable[[int], socket.socket]]:
    """Raw client connections to a port, closed at the end of the test."""
    opened: list[socket.socket] = []

    def open_one(port: int) -> socket.socket:
        connection = socket.create_connection(("127.0.0.1", port), timeout=5)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        opened.append(connection)
        return connection

    yield open_one
    for connection in opened:
        connection.close()


def read_until_closed(connection: socket.socket) -> bytes:
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    return data


def test_a_slow_head_is_cut_off_at_the_header_timeout_while_an_honest_client_is_answered(connect) -> None:
    """A header line every 0.25 s does not keep a connection past its 1 s head deadline, nor does
    sending nothing; a client that sends whole requests is answered all the while."""
    server = serving(HttpLimits(header_timeout=1.0))
    try:
        slow, silent = connect(server.port), connect(server.port)
        opened = time.monotonic()
        slow.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
        slow.settimeout(0.25)
        lines, answered = 1, 0
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as honest:
            while True:
                assert honest.get("/honest").json() == {"path": "/honest", "bytes": 0}
                answered += 1
                try:
                    reply = slow.recv(65536)
                    break
                except TimeoutError:
                    slow.sendall(b"X-Line-%d: 1\r\n" % lines)
                    lines += 1
                assert time.monotonic() - opened < 5, "the slow connection was not closed"
        held = time.monotonic() - opened
        reply += read_until_closed(slow)
        silent.settimeout(5)
        assert read_until_closed(silent) == b""  # no request begun: closed without a word
        silent_held = time.monotonic() - opened
    finally:
        server.stop()
    assert 0.9 <= held <= 1.8 and lines >= 3 and answered >= 3, (held, lines, answered)
    assert reply.startswith(b"HTTP/1.1 408 ") and b'"the request head did not arrive within 1 s"' in reply
    assert 0.9 <= silent_held <= 1.8


def test_connections_past_the_bound_are_answered_503_and_closed(connect) -> None:
    server = serving(HttpLimits(max_connections=3))
    try:
        held = [connect(server.port) for _ in range(3)]
        refused = connect(server.port)
        refused.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_until_closed(refused)
        held.pop().close()
        time.sleep(0.1)  # the server sees it go
        fresh = httpx.get(f"http://127.0.0.1:{server.port}/again", timeout=5)
    finally:
        server.stop()
    assert answer.startswith(b"HTTP/1.1 503 ") and b"3 connections open" in answer
    assert fresh.status_code == 200


def test_an_idle_connection_and_a_slow_body_are_closed(connect) -> None:
    server = serving(HttpLimits(idle_timeout=0.5, body_timeout=0.5))
    try:
        idle = connect(server.port)
        idle.sendall(b"GET /once HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        answered = read_until_closed(idle)
        idle_held = time.monotonic() - started
        slow_body = connect(server.port)
        slow_body.sendall(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        started = time.monotonic()
        cut = read_until_closed(slow_body)
        body_held = time.monotonic() - started
    finally:
        server.stop()
    assert answered.startswith(b"HTTP/1.1 200 ") and 0.4 <= idle_held <= 1.3
    assert cut.startswith(b"HTTP/1.1 408 ") and b"body did not arrive within 0.5 s" in cut and 0.4 <= body_held <= 1.3


def test_bodies_past_the_limit_are_refused_unread_and_requests_keep_their_order(connect) -> None:
    """413 from the Content-Length, before the body is sent (no 100 Continue), and the connection
    closed; a chunked body counted as it comes; pipelined requests answered in order."""
    server = serving(HttpLimits(), max_body_bytes=1024)
    try:
        large = connect(server.port)
        large.sendall(b"POST /large HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\nExpect: 100-continue\r\n\r\n")
        refused = read_until_closed(large)
        chunked = httpx.post(f"http://127.0.0.1:{server.port}/chunked", content=iter([b"x" * 1000, b"y" * 1000]),
                             timeout=5)
        pipelined = connect(server.port)
        pipelined.sendall(b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
                          b"GET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        both = read_until_closed(pipelined)
    finally:
        server.stop()
    assert refused.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in refused
    assert b"connection: close" in refused.lower() and b"Content-Length must be 0-1024 bytes" in refused
    assert chunked.status_code == 413 and "larger than 1024 bytes" in chunked.json()["error"]
    assert both.count(b"HTTP/1.1 200 ") == 2 and both.index(b'"/one"') < both.index(b'"/two"')


def test_stop_is_prompt_with_slow_connections_open(connect) -> None:
    server = serving(HttpLimits())
    connections = [connect(server.port) for _ in range(200)]
    for connection in connections[:100]:
        connection.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\n")  # half a head
    for connection in connections[100:150]:
        connection.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")  # half a body
    time.sleep(0.2)
    started = time.monotonic()
    server.stop()
    stopped = time.monotonic() - started
    for connection in connections:
        read_until_closed(connection)  # each is closed (a timeout would raise)
    assert stopped < 1.5, stopped
