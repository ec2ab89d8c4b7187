"""The HTTP server for JSON APIs, without TensorFlow: the local server's REST API and the gateway's
both answer through it. ``respond(request) -> Reply`` does the work, in a bounded pool of threads;
the body size is checked before it is read.

It is uvicorn (its h11 protocol) on an event loop of its own thread, so a connection that is open
but not sending costs a few kilobytes, not a thread. Around uvicorn, ``GuardedH11`` adds what
uvicorn alone lacks against slow or idle clients (``HttpLimits``): a deadline for each request head
(uvicorn's keep-alive timer stops at a request's first byte, and a new connection has none, so a
client sending a header line every few seconds was held for ever), one for its body, and a bound on
open connections, past which a connection is answered 503 and closed.

Bodies are taken as TF Serving's HTTP server (libevent, ``net_http``) takes them: with a
Content-Length or chunked (``Transfer-Encoding: chunked``), and a ``Content-Encoding: gzip`` body
is decompressed first (``auto_uncompress_input``, up to 100 MB), so ``respond`` sees plain bytes
and no Content-Encoding."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import socket
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Callable, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from storage.errors import MnistError

log = logging.getLogger("mnist.http")
JSON = "application/json"
GZIP_MAX_BYTES = 100 << 20  # net_http's ZLib::kMaxUncompressedBytes
MAX_HEAD_BYTES = 64 << 10  # a request line and headers; http.server's line limit, which this replaced
REFUSED_LINGER = 1.0  # seconds a refused connection is kept for its client to read the 503
SPARE_FILES = 256  # open files beside the connections: models, logs, the store's and gRPC's sockets


@dataclass(frozen=True)
class HttpLimits:
    """What a client may hold of the server, and for how long (Go's net/http has the same three
    timeouts: ReadHeaderTimeout, ReadTimeout for the body, IdleTimeout)."""

    header_timeout: float = 10.0  # from a connection's start, or a request's first byte, to its blank line
    body_timeout: float = 60.0  # from the end of the head to the end of the body (16 MiB at 280 kB/s)
    idle_timeout: float = 30.0  # a kept-alive connection with no request
    max_connections: int = 4096  # open at once; one more is answered 503 and closed
    threads: int = 4 * (os.cpu_count() or 1)  # answering at once (TF Serving's --rest_api_num_threads default)

    def __post_init__(self) -> None:
        timeouts = {"header": self.header_timeout, "body": self.body_timeout, "idle": self.idle_timeout}
        for name, seconds in timeouts.items():
            if not seconds > 0:
                raise ValueError(f"the REST {name} timeout must be above 0 seconds, not {seconds:g}")
        for name, count in {"connections": self.max_connections, "threads": self.threads}.items():
            if count < 1:
                raise ValueError(f"the REST {name} must be at least 1, not {count}")


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string
    query: str
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(payload).encode(), JSON, headers or {})


class BodyError(MnistError):
    """A request body that cannot be taken, with the HTTP status that says why."""

    status = "INVALID_ARGUMENT"

    def __init__(self, http: int, message: str):
        super().__init__(message, http=http)


class Disconnected(MnistError):
    """The client left (or was cut off) before its body was in."""


def gunzip(body: bytes, limit: int = GZIP_MAX_BYTES) -> bytes:
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)  # the gzip wrapper
    try:
        data = decompressor.decompress(body, limit)
    except zlib.error as error:
        raise BodyError(400, f"the body is not gzip, as its Content-Encoding says: {error}") from None
    if decompressor.unconsumed_tail:
        raise BodyError(413, f"the gzip body is larger than {limit} bytes decompressed")
    if not decompressor.eof:
        raise BodyError(400, "the gzip body is cut short")
    return data


def raw_reply(status: int, message: str) -> bytes:
    """A whole reply that closes the connection, for when no request is there to answer through h11."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: {JSON}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's head and body, and a bound on
    connections. One deadline at a time: the head's from the connection's start (or the request's
    first byte), then the body's; none while a request is answered; uvicorn's keep-alive timer
    (``idle_timeout``) between requests."""

    limits: ClassVar[HttpLimits]
    refusing: ClassVar[set[GuardedH11]]  # connections answered 503, not yet closed
    deadline: asyncio.TimerHandle | None = None
    refused = False  # past the bound: answered 503, closing
    deadline_for: object = None  # their (h11) state the deadline is for: IDLE (the head) or SEND_BODY

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # TCP_NODELAY: the head and the body leave in two writes, and with Nagle's algorithm the body
        # waits for the client's delayed ACK: 40 ms on every answer. asyncio sets it only on sockets
        # whose proto is IPPROTO_TCP, which a socket.create_server listener's are not (proto 0).
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)  # type: ignore[arg-type]
        if len(self.connections) - len(self.refusing) > self.limits.max_connections:
            self.refuse()
            return
        self.arm(h11.IDLE, self.limits.header_timeout)

    def refuse(self) -> None:
        """503, then our side shut: closed at once, the unread request would make the kernel reset the
        connection, and the client lose the answer; closed in a second whatever the client does."""
        self.refused = True
        self.refusing.add(self)  # not counted against the bound; still closed at stop, as uvicorn's own
        self.transport.write(raw_reply(503, f"this server has {self.limits.max_connections} connections open, "
                                            "its most; try again later"))
        self.transport.write_eof()
        self.loop.call_later(REFUSED_LINGER, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.deadline is None and self.conn.their_state is h11.IDLE:  # a next request's first byte
            self.arm(h11.IDLE, self.limits.header_timeout)
        super().data_received(data)
        self.follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # pipelined requests may start here
        self.follow()

    def follow(self) -> None:
        """The deadline for the state the request is in now."""
        state = self.conn.their_state
        if state is self.deadline_for:
            return
        self.disarm()
        if state is h11.SEND_BODY:
            self.arm(state, self.limits.body_timeout)
        elif state is h11.IDLE and self.conn.trailing_data[0]:  # part of a pipelined head
            self.arm(state, self.limits.header_timeout)

    def arm(self, state: Any, seconds: float) -> None:
        self.disarm()
        self.deadline, self.deadline_for = self.loop.call_later(seconds, self.expire), state

    def disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.deadline = self.deadline_for = None

    def expire(self) -> None:
        """Past the deadline: a request begun is answered 408; either way the connection is closed."""
        which, seconds = (("body", self.limits.body_timeout) if self.deadline_for is h11.SEND_BODY
                          else ("head", self.limits.header_timeout))
        self.deadline = self.deadline_for = None
        if self.transport.is_closing():
            return
        begun = self.conn.their_state is h11.SEND_BODY or bool(self.conn.trailing_data[0])
        if begun and not (self.cycle and self.cycle.response_started and not self.cycle.response_complete):
            self.transport.write(raw_reply(408, f"the request {which} did not arrive within {seconds:g} s"))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        self.refusing.discard(self)
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """At stop: a request still arriving is not waited for (uvicorn would, for its body)."""
        if self.conn.their_state is h11.SEND_BODY:
            self.transport.close()
        else:
            super().shutdown()

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot read (a malformed head, chunk or Content-Length): JSON as every other
        answer here, where uvicorn writes plain text."""
        self.logger.debug("%s", msg)
        self.transport.write(raw_reply(400, f"malformed HTTP request: {msg}"))
        self.transport.close()


def guarded_protocol(limits: HttpLimits) -> type[GuardedH11]:
    return type("GuardedH11", (GuardedH11,), {"limits": limits, "refusing": set()})


def open_files_for(connections: int) -> int:
    """Raise this process's soft open-file limit toward what ``connections`` need (as Go's runtime
    raises it to the hard limit at start); the number of connections it then allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return connections if soft == resource.RLIM_INFINITY else max(1, min(connections, soft - SPARE_FILES))


class HttpServer:
    def __init__(self, host: str, port: int, max_body_bytes: int, respond: Callable[[Request], Reply],
                 name: str = "http", limits: HttpLimits = HttpLimits()):
        allowed = open_files_for(limits.max_connections)
        if allowed < limits.max_connections:
            log.warning("%s: the open-file limit allows %d connections, not %d", name, allowed, limits.max_connections)
            limits = HttpLimits(limits.header_timeout, limits.body_timeout, limits.idle_timeout, allowed,
                                limits.threads)
        self.limits, self.max_body_bytes, self.respond = limits, max_body_bytes, respond
        self.pool = ThreadPoolExecutor(limits.threads, thread_name_prefix=name)
        self.socket = socket.create_server((host, port), backlog=2048)
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(self.app, http=guarded_protocol(limits), loop="asyncio", lifespan="off",
                                interface="asgi3", log_config=None, log_level="warning", access_log=False,
                                proxy_headers=False, server_header=False, backlog=2048,
                                timeout_keep_alive=limits.idle_timeout,  # type: ignore[arg-type]  # a float works
                                timeout_graceful_shutdown=3, h11_max_incomplete_event_size=MAX_HEAD_BYTES)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, name=name,
                                       daemon=True)

    def start(self) -> "HttpServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if not self.server.started:
            raise RuntimeError(f"the HTTP server on port {self.port} did not start")
        return self

    def stop(self) -> None:
        """Stop listening, close the connections not being answered, let those that are finish
        (3 s at most), then stop the threads."""
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.socket.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # --- the ASGI application: a request in, respond() in the pool, its reply out -----------------
    async def app(self, scope: dict[str, Any], receive: Callable[[], Any], send: Callable[[Any], Any]) -> None:
        if scope["type"] != "http":
            return
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        try:
            body = await self.read_body(headers, receive)
        except Disconnected:
            return
        except BodyError as error:  # the unread body would be taken for the next request
            await self.send(send, json_reply(error.http_status, {"error": str(error)}), close=True)
            return
        path, _, query = scope["raw_path"].decode("latin-1").partition("?")
        request = Request(scope["method"], path, scope["query_string"].decode("latin-1"), headers, body)
        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(self.pool, self.answer, request)
        await self.send(send, reply)

    async def read_body(self, headers: dict[str, str], receive: Callable[[], Any]) -> bytes:
        limit = self.max_body_bytes
        if "chunked" not in headers.get("transfer-encoding", "").lower():
            length = int(headers.get("content-length") or 0)  # h11 has checked it is digits
            if length > limit:
                raise BodyError(413, f"Content-Length must be 0-{limit} bytes")
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Disconnected()
            part = message.get("body", b"")
            size += len(part)
            if size > limit:
                raise BodyError(413, f"the chunked body is larger than {limit} bytes")
            parts.append(part)
            if not message.get("more_body", False):
                return b"".join(parts)

    def answer(self, request: Request) -> Reply:
        """``respond`` with the body inflated; a bug answers 500 and is logged, the connection lives on."""
        headers = request.headers
        try:
            if "gzip" in headers.get("content-encoding", ""):  # net_http's StrContains test
                body = gunzip(request.body, self.max_body_bytes)  # the same limit, inflated: no bomb
                headers = {name: value for name, value in headers.items() if name != "content-encoding"}
                request = Request(request.method, request.path, request.query, headers, body)
        except BodyError as error:
            return json_reply(error.http_status, {"error": str(error)})
        try:
            return self.respond(request)
        except Exception:  # noqa: BLE001
            log.exception("%s %s failed", request.method, request.path)
            return json_reply(500, {"error": f"internal error answering {request.method} {request.path}; "
                                             "the server's log has the traceback"})

    @staticmethod
    async def send(send: Callable[[Any], Any], reply: Reply, close: bool = False) -> None:
        headers = [(b"content-type", reply.content_type.encode("latin-1")),
                   (b"content-length", str(len(reply.body)).encode())]
        headers += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in reply.headers.items()]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})
