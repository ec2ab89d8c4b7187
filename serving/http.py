"""A small threaded HTTP server for JSON APIs, without TensorFlow: the local server's REST API
and the gateway's both answer through it. ``respond(request) -> Reply`` does the work;
the body size is checked before it is read."""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

JSON = "application/json"


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


class HttpServer:
    def __init__(self, host: str, port: int, max_body_bytes: int, respond: Callable[[Request], Reply],
                 name: str = "http"):
        open_connections: set[socket.socket] = set()
        self.open_connections, self.lock = open_connections, threading.Lock()
        lock = self.lock

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: a client (or the gateway) reuses its connection

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

            def answer(self) -> None:
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if length < 0 or length > max_body_bytes:
                    self.close_connection = True  # the unread body would be taken for the next request
                    self.send(json_reply(400 if length < 0 else 413,
                                         {"error": f"Content-Length must be 0-{max_body_bytes} bytes"}))
                    return
                path, _, query = self.path.partition("?")
                self.send(respond(Request(self.command, path, query,
                                          {k.lower(): v for k, v in self.headers.items()}, self.rfile.read(length))))

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
