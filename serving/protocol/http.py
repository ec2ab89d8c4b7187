"""A small threaded HTTP server for JSON APIs, without TensorFlow: the local server's REST API
and the gateway's both answer through it. ``respond(request) -> Reply`` does the work;
the body size is checked before it is read.

Bodies are taken as TF Serving's HTTP server (libevent, ``net_http``) takes them: with a
Content-Length or chunked (``Transfer-Encoding: chunked``), and a ``Content-Encoding: gzip``
body is decompressed first (``auto_uncompress_input``, up to 100 MB), so ``respond`` sees plain
bytes and no Content-Encoding."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO, Callable

log = logging.getLogger("mnist.http")
JSON = "application/json"
GZIP_MAX_BYTES = 100 << 20  # net_http's ZLib::kMaxUncompressedBytes
CHUNK_LINE_BYTES = 1024  # a chunk-size line longer than this is not one


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


class BodyError(Exception):
    """A request body that cannot be taken, with the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_chunked(stream: BinaryIO | io.BufferedIOBase, limit: int) -> bytes:
    """A ``Transfer-Encoding: chunked`` body (RFC 9112, 7.1) of at most ``limit`` bytes; trailer
    fields are read and dropped. Written here: http.server reads no chunked request bodies."""
    parts, size = [], 0
    while True:
        line = stream.readline(CHUNK_LINE_BYTES)
        try:
            chunk = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BodyError(400, f"malformed chunked body: chunk size line {line[:40]!r}") from None
        if chunk == 0:
            break
        size += chunk
        if chunk < 0 or size > limit:
            raise BodyError(413, f"the chunked body is larger than {limit} bytes")
        data = stream.read(chunk)
        if len(data) != chunk or stream.read(2) != b"\r\n":
            raise BodyError(400, "malformed chunked body: a chunk is cut short")
        parts.append(data)
    while stream.readline(CHUNK_LINE_BYTES) not in (b"\r\n", b"\n", b""):
        pass
    return b"".join(parts)


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


class HttpServer:
    def __init__(self, host: str, port: int, max_body_bytes: int, respond: Callable[[Request], Reply],
                 name: str = "http"):
        open_connections: set[socket.socket] = set()
        self.open_connections, self.lock = open_connections, threading.Lock()
        lock = self.lock

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: a client (or the gateway) reuses its connection
            # TCP_NODELAY: the headers and the body leave in two writes, and with Nagle's algorithm the
            # body waits for the client's delayed ACK of the headers: 40 ms on every answer
            disable_nagle_algorithm = True

            def setup(self) -> None:
                super().setup()
                with lock:
                    open_connections.add(self.connection)

            def finish(self) -> None:
                with lock:
                    open_connections.discard(self.connection)
                super().finish()

            def send(self, reply: Reply) -> None:
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(reply.body)

            def read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    return read_chunked(self.rfile, max_body_bytes)
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if length < 0 or length > max_body_bytes:
                    raise BodyError(400 if length < 0 else 413, f"Content-Length must be 0-{max_body_bytes} bytes")
                return self.rfile.read(length)

            def answer(self) -> None:
                try:
                    body = self.read_body()
                except BodyError as error:
                    self.close_connection = True  # the unread body would be taken for the next request
                    self.send(json_reply(error.status, {"error": str(error)}))
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    if "gzip" in headers.get("content-encoding", ""):  # net_http's StrContains test
                        body = gunzip(body, max_body_bytes)  # the same limit, inflated: no bomb
                        del headers["content-encoding"]
                except BodyError as error:
                    self.send(json_reply(error.status, {"error": str(error)}))
                    return
                path, _, query = self.path.partition("?")
                try:
                    reply = respond(Request(self.command, path, query, headers, body))
                except Exception:  # noqa: BLE001  a bug answers 500 and is logged; the connection lives on
                    log.exception("%s %s failed", self.command, path)
                    reply = json_reply(500, {"error": f"internal error answering {self.command} {path}; "
                                                      "the server's log has the traceback"})
                self.send(reply)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = answer  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  quiet access log
                return

        self.http = ThreadingHTTPServer((host, port), Handler)
        self.http.daemon_threads = True
        self.port = self.http.server_address[1]
        self.thread = threading.Thread(target=self.http.serve_forever, name=name, daemon=True)

    def start(self) -> "HttpServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop listening, and end the kept-alive connections their threads are still waiting on."""
        self.http.shutdown()
        self.http.server_close()
        with self.lock:
            for connection in list(self.open_connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
