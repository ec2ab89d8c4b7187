"""The gateway's gRPC side: the caller's HTTP/2 connection relayed frame by frame to upstream,
not ended in a gRPC server and started again in a gRPC client.

Why code of our own: a second Python gRPC hop (grpcio server plus client) adds 0.85-1.1 ms per
call at p50 on two cores (`bench/gateway.py`'s bare pass-through), above the 0.5 ms a gateway
may cost. Relaying frames keeps the call one gRPC call, end to end. Header blocks are read with
``hpack`` (python-hyper's, under h2 and httpx); the 9-byte frame headers by ``serving/gateway/http2.py``,
because most frames pass unread and a parsed frame object per frame would cost more than the relay.

What the relay changes on the wire, and nothing else:
- the caller's header blocks are decoded and written again as literals that enter no HPACK
  table, so a header can be set: a watched call's id header (the gateway's ``x-request-id``);
- upstream's blocks reach the caller as they came, a watched call's trailers with the id
  header appended as such a literal, which leaves both tables in step.
DATA, SETTINGS, PING, WINDOW_UPDATE, RST_STREAM and GOAWAY pass unchanged, so flow control,
deadlines, keepalives and shutdowns stay the two ends' own. The bodies of watched calls are
kept (up to ``max_message_bytes``) and handed, with the call's status, to ``finished``.

Frames are views of the bytes as read (``serving/gateway/http2.py``), not copies: a megabyte request
crosses the relay as one copy out (the frames joined for the socket) and one for its kept body
(joined once, when the call has ended).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import cast

from hpack import Decoder

from serving.gateway.http2 import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PING,
    PREFACE,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    FrameReader,
    frame,
    goaway,
    grpc_unavailable,
    header_frames,
    header_table_size,
    literal,
    ping_ack,
    reset,
    settings_ack,
    unpadded,
    window_update,
)
from serving.gateway.upstream_probe import ANSWER_SECONDS, UpstreamProbe
from serving.gateway.watched_calls import Body, Exchange, Watch

log = logging.getLogger("mnist.gateway")

CANCELLED = 1  # grpc.StatusCode.CANCELLED's number, for a stream reset before its trailers
UNAVAILABLE = 14
STANDING_IN = b"upstream unavailable: the model server is not answering (restarting?); retry"


class Link:
    """One caller's connection and its own connection upstream."""

    def __init__(self, relay: "GrpcRelay", client: asyncio.Transport):
        self.relay, self.client = relay, client
        self.upstream: asyncio.Transport | None = None  # the caller is not read until it is there,
        self.early = bytearray()  # but a read already under way when the caller connected lands here
        self.from_client, self.from_upstream = FrameReader(len(PREFACE)), FrameReader()
        self.client_table, self.upstream_table = Decoder(), Decoder()
        self.blocks: dict[str, tuple[int, int, bytearray, bytearray]] = {}  # a header block across CONTINUATIONs
        self.exchanges: dict[int, Exchange] = {}
        self.ended: list[tuple[Exchange, int, str]] = []  # recorded once the bytes that ended them are sent
        self.closed = False
        # what standing in for a gone upstream needs: the streams it leaves unanswered, the newest
        # stream (for GOAWAY), whether the caller has had a server's SETTINGS yet
        self.open_streams: set[int] = set()
        self.last_stream = 0
        self.heard_upstream_settings = False
        self.standing_in = False

    # --- bytes in -------------------------------------------------------------------------
    def client_bytes(self, data: bytes) -> None:
        if self.standing_in:
            self.answer_alone(data)
            return
        passed, frames = self.from_client.feed(data)
        out: list[bytes | memoryview] = [passed]
        for kind, flags, stream, payload, raw in frames:
            if kind in (HEADERS, CONTINUATION):
                whole = self.header_block("client", kind, flags, stream, payload, raw)
                if whole:
                    stream, flags, block, _ = whole
                    if stream > self.last_stream:
                        self.last_stream = stream
                        self.open_streams.add(stream)
                    out.append(header_frames(stream, flags & END_STREAM, self.request_block(stream, block)))
                continue
            self.read_passing(True, kind, flags, stream, payload)
            out.append(raw)
        self.send_upstream(b"".join(out))
        self.record_ended()

    def upstream_bytes(self, data: bytes) -> None:
        _, frames = self.from_upstream.feed(data)
        out: list[bytes | memoryview] = []
        for kind, flags, stream, payload, raw in frames:
            if kind == PUSH_PROMISE:  # its header block would go unread; gRPC callers turn push off
                raise ConnectionError("upstream sent PUSH_PROMISE, which gRPC does not use")
            if kind in (HEADERS, CONTINUATION):
                whole = self.header_block("upstream", kind, flags, stream, payload, raw)
                if whole:
                    if whole[1] & END_STREAM:
                        self.open_streams.discard(whole[0])
                    out.append(self.response_block(*whole))
                continue
            self.read_passing(False, kind, flags, stream, payload)
            out.append(raw)
        if out:
            self.client.write(b"".join(out))
        self.record_ended()

    def read_passing(self, from_client: bool, kind: int, flags: int, stream: int, payload: memoryview) -> None:
        """What the relay takes from a frame it passes unchanged: a watched call's body, the
        table size one side's encoder is now bound by, a call reset."""
        exchange = self.exchanges.get(stream) if stream else None
        if kind == DATA and exchange:
            self.keep(exchange, exchange.request if from_client else exchange.response, unpadded(kind, flags, payload))
        elif kind == SETTINGS and not flags & ACK:
            self.heard_upstream_settings |= not from_client
            if (size := header_table_size(payload)) is not None:
                # a side's SETTINGS bind the other side's encoder, whose blocks this relay decodes
                (self.upstream_table if from_client else self.client_table).max_allowed_table_size = size
        elif kind == RST_STREAM:
            self.open_streams.discard(stream)
            if exchange:
                self.end(stream, CANCELLED, "cancelled by the caller" if from_client else "reset by upstream")

    # --- header blocks ----------------------------------------------------------------------
    def header_block(self, side: str, kind: int, flags: int, stream: int, payload: memoryview, raw: memoryview
                     ) -> tuple[int, int, bytes, bytes] | None:
        """The whole block once END_HEADERS arrives: (stream, the HEADERS frame's flags, block, raw frames)."""
        if kind == HEADERS:
            self.blocks[side] = (stream, flags, bytearray(), bytearray())
        started = self.blocks.get(side)
        if started is None:
            raise ConnectionError("CONTINUATION without HEADERS")
        started[2].extend(unpadded(kind, flags, payload))
        started[3].extend(raw)
        if not flags & END_HEADERS:
            return None
        del self.blocks[side]
        return started[0], started[1], bytes(started[2]), bytes(started[3])

    def request_block(self, stream: int, block: bytes) -> bytes:
        """The caller's block, written again as literals; a watched call gets its request id."""
        decoded = self.client_table.decode(block, raw=True)
        headers: list[tuple[bytes, bytes]] = [(name, value) for name, value in decoded]
        watch, named = self.relay.watch, dict(headers)
        if stream not in self.exchanges and named.get(b":path") == watch.path:
            given = named.get(watch.id_header)
            request_id = watch.request_id(given.decode("latin-1") if given is not None else None)
            exchange = self.exchanges[stream] = Exchange(request_id, given.decode("latin-1") if given else None)
            exchange.request_encoding = named.get(b"grpc-encoding", b"identity")
            headers = [(name, value) for name, value in headers if name != watch.id_header]
            headers.append((watch.id_header, request_id.encode()))
        return b"".join(literal(name, value) for name, value in headers)

    def response_block(self, stream: int, flags: int, block: bytes, raw: bytes) -> bytes:
        """Upstream's block as it came; a watched call's trailers with its request id appended."""
        headers = dict(self.upstream_table.decode(block, raw=True))  # read every block: the table stays in step
        exchange = self.exchanges.get(stream)
        if exchange is None:
            return raw
        if not flags & END_STREAM:  # the response headers
            exchange.response_encoding = headers.get(b"grpc-encoding", b"identity")
            return raw
        status = headers.get(b"grpc-status", b"2")  # 2: UNKNOWN, as gRPC reads trailers without one
        message = headers.get(b"grpc-message", b"").decode("latin-1")
        trailers = header_frames(stream, END_STREAM,
                                 block + literal(self.relay.watch.id_header, exchange.request_id.encode()))
        self.end(stream, int(status) if status.isdigit() else 2, message)
        return trailers

    # --- calls --------------------------------------------------------------------------
    def keep(self, exchange: Exchange, body: Body, data: memoryview) -> None:
        if len(body) + len(data) > self.relay.watch.max_message_bytes:
            exchange.oversized = True
            body.clear()
        elif not exchange.oversized:
            body.add(data)

    def end(self, stream: int, status: int, message: str) -> None:
        self.ended.append((self.exchanges.pop(stream), status, message))

    def record_ended(self) -> None:
        """Hand ended calls to the gateway, after the caller has its answer: their parsing,
        metrics and logging are not on the caller's clock."""
        ended, self.ended = self.ended, []
        for exchange, status, message in ended:
            try:
                self.relay.watch.finished(exchange, status, message)
            except Exception:  # noqa: BLE001  what the gateway does with a call never breaks the relay
                log.exception("a finished call could not be recorded")

    # --- transports ---------------------------------------------------------------------------
    def send_upstream(self, out: bytes) -> None:
        if not out:
            return
        if self.upstream is None:
            self.early += out
        else:
            self.upstream.write(out)

    def upstream_connected(self, transport: asyncio.Transport) -> None:
        if self.closed:
            transport.close()
            return
        self.upstream = transport
        if self.early:
            transport.write(bytes(self.early))
            self.early.clear()
        self.client.resume_reading()

    def answered_or_stand_in(self) -> None:
        if not self.heard_upstream_settings and not self.standing_in:
            self.stand_in(f"it took the connection but sent no HTTP/2 SETTINGS within {ANSWER_SECONDS:g} s")

    def close(self) -> None:
        """The caller gone, or a side broke the protocol: both connections close, calls in flight end."""
        if self.closed:
            return
        self.closed = True
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()
        self.exchanges.clear()
        self.relay.links.discard(self)
        self.relay.probe.release(self)

    # --- standing in for a gone upstream -------------------------------------------------------
    def stand_in(self, reason: str) -> None:
        """Upstream went away (a restart, a crash) or cannot be reached: keep the caller's connection,
        refuse the calls in flight (REFUSED_STREAM: gRPC retries them, as nothing ran) and answer new
        ones UNAVAILABLE at once until upstream is back; then GOAWAY sends the caller to reconnect
        at once. Closing the connection instead puts a gRPC caller in its reconnect backoff (1 s
        growing to 120 s): seconds of failures after upstream is back."""
        if self.closed or self.standing_in:
            return
        self.standing_in = True
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()
        self.early.clear()
        self.blocks.pop("upstream", None)
        out = [] if self.heard_upstream_settings else [frame(SETTINGS, 0, 0, b"")]  # a server's preface
        out += [reset(stream, REFUSED_STREAM) for stream in sorted(self.open_streams)]
        self.open_streams.clear()
        for stream in list(self.exchanges):
            self.end(stream, UNAVAILABLE, f"upstream connection lost: {reason}")
        self.client.write(b"".join(out))
        self.client.resume_reading()
        self.record_ended()
        self.relay.probe.hold(self, reason)

    def answer_alone(self, data: bytes) -> None:
        """The caller's frames while upstream is gone: each new call answered UNAVAILABLE, its
        request bytes dropped and given back to the connection's window, SETTINGS and PINGs
        acknowledged (a caller whose keepalive PING goes unanswered closes the connection)."""
        _, frames = self.from_client.feed(data)
        out: list[bytes] = []
        for kind, flags, stream, payload, raw in frames:
            if kind in (HEADERS, CONTINUATION):
                whole = self.header_block("client", kind, flags, stream, payload, raw)
                if whole:
                    self.client_table.decode(whole[2], raw=True)  # every block read: the table stays in step
                    if whole[0] > self.last_stream:
                        self.last_stream = whole[0]
                        out.append(grpc_unavailable(whole[0], STANDING_IN))
            elif kind == DATA and payload:
                out.append(window_update(0, len(payload)))
            elif kind == SETTINGS and not flags & ACK:
                out.append(settings_ack())
            elif kind == PING and not flags & ACK:
                out.append(ping_ack(payload))
        if out:
            self.client.write(b"".join(out))

    def send_away(self) -> None:
        """Upstream is back: GOAWAY (no stream lost: each was answered) and close, so the caller
        connects again at once, through a new link to the new upstream."""
        if not self.closed:
            self.client.write(goaway(self.last_stream))
            self.close()


class ClientSide(asyncio.Protocol):
    link: Link  # from connection_made, which asyncio calls before any other callback

    def __init__(self, relay: "GrpcRelay"):
        self.relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # a TCP server's transport: it reads and writes
        self.link = Link(self.relay, stream)
        self.relay.links.add(self.link)
        stream.pause_reading()  # until upstream answers: nothing to buffer meanwhile
        asyncio.get_running_loop().create_task(self.relay.connect_upstream(self.link))

    def data_received(self, data: bytes) -> None:
        try:
            self.link.client_bytes(data)
        except Exception as error:  # noqa: BLE001  a malformed connection is closed, never the relay
            log.warning("gRPC connection from a caller closed: %s: %.200s", type(error).__name__, error)
            self.link.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.close()

    def pause_writing(self) -> None:  # the caller reads slower than upstream answers
        if self.link.upstream is not None:
            self.link.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.link.upstream is not None:
            self.link.upstream.resume_reading()


class UpstreamSide(asyncio.Protocol):
    def __init__(self, link: Link):
        self.link = link

    def data_received(self, data: bytes) -> None:
        try:
            self.link.upstream_bytes(data)
        except Exception as error:  # noqa: BLE001  see ClientSide
            log.warning("gRPC connection to upstream closed: %s: %.200s", type(error).__name__, error)
            self.link.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.stand_in(f"{exc}" if exc else "upstream closed the connection")

    def pause_writing(self) -> None:  # upstream reads slower than the caller sends
        self.link.client.pause_reading()

    def resume_writing(self) -> None:
        self.link.client.resume_reading()


class GrpcRelay:
    """Listens on ``host:port`` and relays each connection to ``upstream`` (HOST:PORT), on an
    asyncio loop of its own thread."""

    loop: asyncio.AbstractEventLoop  # with server, from start()
    server: asyncio.base_events.Server

    def __init__(self, host: str, port: int, upstream: str, watch: Watch):
        self.host, self.requested_port, self.watch = host, port, watch
        host, _, upstream_port = upstream.rpartition(":")
        self.upstream_host, self.upstream_port = host.strip("[]"), int(upstream_port)  # [::1]:8500 too
        self.links: set[Link] = set()
        self.probe = UpstreamProbe(self.upstream_host, self.upstream_port)
        self.thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> "GrpcRelay":
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway-grpc", daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            self.loop.create_server(lambda: ClientSide(self), self.host, self.requested_port), self.loop).result()
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def connect_upstream(self, link: Link) -> None:
        try:
            transport, _ = await self.loop.create_connection(lambda: UpstreamSide(link), self.upstream_host,
                                                             self.upstream_port)
        except OSError as error:
            link.stand_in(f"unreachable: {error.strerror or error}")
            return
        link.upstream_connected(cast(asyncio.Transport, transport))
        # a server stopped (SIGSTOP, a frozen VM) or a listener that is not one takes the connection
        # and never answers: calls would hang to their deadlines instead of failing at once
        self.loop.call_later(ANSWER_SECONDS, link.answered_or_stand_in)

    def in_flight(self) -> int:
        async def count() -> int:  # on the loop, which alone changes the links
            return sum(len(link.exchanges) for link in self.links)
        return asyncio.run_coroutine_threadsafe(count(), self.loop).result()

    def stop(self, grace: float = 2.0) -> None:
        """Take no more connections, give watched calls in flight ``grace`` seconds, then close."""
        if self.thread is None or not self.thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.server.close)
        deadline = time.monotonic() + grace
        while self.in_flight() and time.monotonic() < deadline:
            time.sleep(0.01)

        async def close_all() -> None:
            for link in list(self.links):
                link.close()
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()  # connects and upstream probes still under way
            if tasks:  # ended here, not garbage-collected later on a closed loop with their sockets open
                await asyncio.wait(tasks, timeout=2)
            await asyncio.sleep(0.05)  # closed transports let their sockets go on the next turns

        asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()
