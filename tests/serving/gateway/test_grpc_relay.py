"""The gateway's gRPC relay against a real grpcio server on loopback: metadata, deadlines,
statuses, compression and shutdown cross it as they would a direct call, and HPACK stays in step
over many calls on one connection."""

from __future__ import annotations

import socket
import threading
import time
from concurrent import futures

import grpc
import pytest

from serving.gateway.http2 import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PREFACE,
    FrameReader,
    frame,
    header_frames,
    literal,
)
from serving.gateway.relay import STANDING_IN, GrpcRelay, Link
from serving.gateway.watched_calls import Body, Watch, grpc_message
from storage.embedded import free_port

WATCHED = "/test.Echo/Predict"
ID_HEADER = b"x-request-id"


class Upstream:
    """A grpcio server whose methods answer with what they saw."""

    def __init__(self, port: int = 0):
        self.seen: list[dict] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {
            "Predict": grpc.unary_unary_rpc_method_handler(self.predict),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
        })])
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()

    def predict(self, body: bytes, context: grpc.ServicerContext) -> bytes:
        metadata = context.invocation_metadata()
        self.seen.append({"metadata": [(item.key, item.value) for item in metadata],
                          "time_remaining": context.time_remaining()})
        context.set_trailing_metadata((("upstream-trailer", f"call-{len(self.seen)}"),))
        if body.startswith(b"fail"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused: " + body.decode())
        return b"answer:" + body

    def slow(self, body: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(0.5)
        return body


@pytest.fixture()
def upstream():
    server = Upstream()
    yield server
    server.server.stop(0)


@pytest.fixture()
def relay(upstream: Upstream):
    finished: list[tuple] = []
    watch = Watch(WATCHED.encode(), ID_HEADER,
                  lambda given: given if given and given.startswith("ok-") else "made-here",
                  lambda exchange, status, message: finished.append((exchange, status, message)))
    relay = GrpcRelay("127.0.0.1", 0, f"127.0.0.1:{upstream.port}", watch).start()
    relay.finished = finished
    yield relay
    relay.stop(grace=0.1)


def test_metadata_deadline_status_and_trailers_cross_the_relay_over_many_calls(upstream: Upstream, relay) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
        call = channel.unary_unary(WATCHED)
        answers = []
        for index in range(40):  # repeated headers are indexed by the caller's HPACK encoder
            given = "ok-mine" if index == 0 else ("not-valid" if index == 1 else None)
            metadata = [("tenant", f"team-{index % 3}"), ("x-request-id", given)] if given else [("tenant", "t")]
            answers.append(call.with_call(f"image-{index}".encode(), timeout=7, metadata=metadata))
        with pytest.raises(grpc.RpcError) as refused:
            call(b"fail-now", timeout=7)
    for index, (answer, outcome) in enumerate(answers):
        assert answer == f"answer:image-{index}".encode()
        trailers = dict(outcome.trailing_metadata())
        assert trailers["upstream-trailer"] == f"call-{index + 1}"
        assert trailers["x-request-id"] == ("ok-mine" if index == 0 else "made-here")
    first, second = upstream.seen[0], upstream.seen[1]
    assert ("tenant", "team-0") in first["metadata"] and ("x-request-id", "ok-mine") in first["metadata"]
    # the caller's invalid id is replaced upstream, not sent beside the gateway's
    assert [value for key, value in second["metadata"] if key == "x-request-id"] == ["made-here"]
    # the caller's deadline went upstream (grpc-timeout is rounded up, hence a little over 7 s)
    assert all(seen["time_remaining"] is not None and 6 < seen["time_remaining"] < 7.5 for seen in upstream.seen)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "refused: fail-now"
    assert dict(refused.value.trailing_metadata())["x-request-id"] == "made-here"
    deadline = time.monotonic() + 10  # a call is recorded after its answer is sent: off the caller's clock
    while len(relay.finished) < 41 and time.monotonic() < deadline:
        time.sleep(0.01)
    statuses = [(status, grpc_message(exchange.request, exchange.request_encoding)) for exchange, status, _ in
                relay.finished]
    assert statuses[0] == (0, b"image-0") and statuses[-1] == (3, b"fail-now") and len(statuses) == 41, statuses[-3:]


def test_a_compressed_call_is_read_whole_and_other_methods_pass_unwatched(upstream: Upstream, relay) -> None:
    body = b"digit" * 5000
    with grpc.insecure_channel(f"127.0.0.1:{relay.port}", compression=grpc.Compression.Gzip) as channel:
        assert channel.unary_unary(WATCHED)(body, timeout=7) == b"answer:" + body
        assert channel.unary_unary("/test.Echo/Slow")(b"x", timeout=7) == b"x"
        with pytest.raises(grpc.RpcError) as unknown:
            channel.unary_unary("/test.Echo/Missing")(b"x", timeout=7)
    assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED  # upstream's own answer
    (exchange, status, _), = relay.finished  # Slow and Missing are not watched
    assert status == 0 and exchange.request_encoding == b"gzip"
    assert grpc_message(exchange.request, exchange.request_encoding) == body
    assert grpc_message(exchange.response, exchange.response_encoding) == b"answer:" + body


def test_concurrent_calls_on_one_connection_keep_their_bodies_apart(upstream: Upstream, relay) -> None:
    """gRPC multiplexes a channel's calls as streams of one connection: each watched call's
    bodies must be its own, whatever the interleaving of their frames."""
    answers: dict[bytes, bytes] = {}
    with grpc.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
        call = channel.unary_unary(WATCHED)

        def caller(index: int) -> None:
            for turn in range(40):
                body = f"{index}-{turn}:".encode() * (1 + 3000 * (turn % 3))  # up to 21 KB: several DATA frames
                answers[body] = call(body, timeout=10)

        callers = [threading.Thread(target=caller, args=(index,)) for index in range(8)]
        for thread in callers:
            thread.start()
        for thread in callers:
            thread.join(timeout=60)
    assert len(answers) == 320 and all(answer == b"answer:" + body for body, answer in answers.items())
    recorded = {grpc_message(exchange.request, exchange.request_encoding):
                grpc_message(exchange.response, exchange.response_encoding) for exchange, _, _ in relay.finished}
    assert recorded == answers


def test_an_unreachable_upstream_is_unavailable_to_the_caller() -> None:
    watch = Watch(WATCHED.encode(), ID_HEADER, lambda given: "id", lambda *_: None)
    relay = GrpcRelay("127.0.0.1", 0, f"127.0.0.1:{free_port()}", watch).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{relay.port}") as channel, pytest.raises(grpc.RpcError) as down:
            channel.unary_unary(WATCHED)(b"x", timeout=3)
    finally:
        relay.stop()
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE


def test_an_upstream_restart_keeps_the_callers_connection_and_it_resumes_at_once(upstream: Upstream, relay) -> None:
    """The model server restarting behind the gateway: calls meanwhile fail UNAVAILABLE at once on
    the caller's own connection (not a closed one, which sends gRPC into its reconnect backoff), and
    the first call after upstream is back succeeds within a second."""
    port = upstream.port
    with grpc.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
        call = channel.unary_unary(WATCHED)
        assert call(b"before", timeout=5) == b"answer:before"
        upstream.server.stop(0).wait()
        outage_ends = time.monotonic() + 8  # long enough for gRPC's backoff to grow past seconds
        while time.monotonic() < outage_ends:
            asked = time.monotonic()
            with pytest.raises(grpc.RpcError) as down:
                call(b"during", timeout=5)
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE
            assert down.value.details() == STANDING_IN.decode(), down.value.details()  # from the kept connection
            assert time.monotonic() - asked < 0.5
            time.sleep(0.2)
        again = Upstream(port)
        try:
            back, answer = time.monotonic(), None
            while answer is None and time.monotonic() - back < 5:
                try:
                    answer = call(b"after", timeout=5)
                except grpc.RpcError:
                    time.sleep(0.02)
            resumed = time.monotonic() - back
        finally:
            again.server.stop(0)
    assert answer == b"answer:after" and resumed < 1.0, f"resumed {resumed:.2f} s after upstream was back"


def test_an_upstream_that_takes_the_connection_but_never_answers_is_unavailable_within_seconds() -> None:
    """A stopped server's kernel (SIGSTOP, a frozen VM) still accepts connections: without a
    deadline of its own the relay would let each call hang to the caller's deadline."""
    from serving.gateway.upstream_probe import ANSWER_SECONDS

    mute = socket.create_server(("127.0.0.1", 0))  # listens, accepts in the kernel, never speaks
    watch = Watch(WATCHED.encode(), ID_HEADER, lambda given: "id", lambda *_: None)
    relay = GrpcRelay("127.0.0.1", 0, f"127.0.0.1:{mute.getsockname()[1]}", watch).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{relay.port}") as channel, pytest.raises(grpc.RpcError) as down:
            asked = time.monotonic()
            channel.unary_unary(WATCHED)(b"x", timeout=30)
        waited = time.monotonic() - asked
    finally:
        relay.stop()
        mute.close()
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE and waited < ANSWER_SECONDS + 2, waited


@pytest.mark.parametrize("malformed", [
    frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\xff\xff"),  # an HPACK index past every table
    frame(CONTINUATION, END_HEADERS, 1, b"\x82"),  # a CONTINUATION with no HEADERS before it
], ids=["bad-hpack", "lone-continuation"])
def test_a_malformed_connection_is_closed_and_the_relay_serves_on(upstream: Upstream, relay, malformed: bytes,
                                                                   caplog) -> None:
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as bad:
        bad.sendall(PREFACE + frame(0x4, 0, 0, b"") + malformed)
        received = b""
        while chunk := bad.recv(65536):  # the relay closes it: recv ends with b""
            received += chunk
    with grpc.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
        assert channel.unary_unary(WATCHED)(b"after", timeout=7) == b"answer:after"
    assert any("gRPC connection from a caller closed" in record.getMessage() for record in caplog.records)


def test_stop_lets_a_watched_call_in_flight_finish(upstream: Upstream) -> None:
    watch = Watch(b"/test.Echo/Slow", ID_HEADER, lambda given: "id", lambda *_: None)
    relay = GrpcRelay("127.0.0.1", 0, f"127.0.0.1:{upstream.port}", watch).start()
    answers: list[bytes] = []
    with grpc.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
        slow = channel.unary_unary("/test.Echo/Slow")
        slow(b"warm", timeout=7)
        caller = threading.Thread(target=lambda: answers.append(slow(b"in flight", timeout=7)))
        caller.start()
        time.sleep(0.2)
        relay.stop(grace=3)
        caller.join()
    assert answers == [b"in flight"]


def test_a_header_block_past_one_frame_is_split_into_continuations_and_read_back_whole() -> None:
    block = bytes(range(256)) * 100  # 25,600 bytes: above the 16,384 every peer takes in a frame
    wire = header_frames(5, END_STREAM, block)
    reader = FrameReader()
    _, frames = reader.feed(wire[:10_000])
    _, rest = reader.feed(wire[10_000:])
    frames += rest
    assert [(kind, flags, stream) for kind, flags, stream, _, _ in frames] == [
        (HEADERS, END_STREAM, 5), (CONTINUATION, END_HEADERS, 5)]
    assert b"".join(payload for _, _, _, payload, _ in frames) == block
    assert b"".join(raw for _, _, _, _, raw in frames) == wire


def test_frames_split_anywhere_across_reads_read_back_as_sent() -> None:
    """Frames are views of the bytes read: one that straddles two reads, its header too, comes
    back whole, and the views stay good after later reads."""
    wire = b"".join(frame(DATA, 0, 1, bytes([n]) * (n * 700)) for n in range(1, 30))
    reader, frames = FrameReader(), []
    for at in range(0, len(wire), 4_099):  # an odd read size: every cut lands somewhere new
        frames += reader.feed(wire[at:at + 4_099])[1]
    assert [bytes(payload) for *_, payload, _ in frames] == [bytes([n]) * (n * 700) for n in range(1, 30)]
    assert b"".join(raw for *_, raw in frames) == wire and reader.left == b""


@pytest.mark.parametrize("cuts", [(), (1,), (3, 4), (5,), (2, 6, 7)])
def test_a_message_is_read_whole_wherever_its_frames_cut_it(cuts: tuple[int, ...]) -> None:
    wire = b"\x00" + (9).to_bytes(4, "big") + b"the whole"
    body = Body()
    for start, end in zip((0, *cuts), (*cuts, len(wire))):
        body.add(memoryview(wire)[start:end])
    assert grpc_message(body, b"identity") == b"the whole"
    body.add(memoryview(b"!"))  # past the length the prefix gives: not part of the message
    assert grpc_message(body, b"identity") == b"the whole"
    short = Body()
    short.add(memoryview(wire)[:-1])
    assert grpc_message(short, b"identity") is None


class Recorder:
    """The transport calls a Link makes, recorded: the order of bytes is what is checked."""

    def __init__(self):
        self.written, self.reading = bytearray(), True

    def write(self, data: bytes) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def test_bytes_read_before_upstream_answers_the_connect_reach_it_first() -> None:
    """Pausing the caller's reads does not stop a read already under way (uvloop delivers it):
    those bytes, the connection preface among them, must reach upstream before any later ones."""
    relay = GrpcRelay("127.0.0.1", 0, "127.0.0.1:1",
                      Watch(WATCHED.encode(), ID_HEADER, lambda given: "id", lambda *_: None))
    caller, upstream = Recorder(), Recorder()
    link = Link(relay, caller)
    settings = frame(0x4, 0, 0, b"")
    link.client_bytes(PREFACE + settings)
    caller.reading = False
    link.upstream_connected(upstream)
    link.client_bytes(settings)
    assert bytes(upstream.written) == PREFACE + settings + settings and caller.reading


@pytest.mark.parametrize("length", [0, 1, 126, 127, 128, 255, 16_383, 16_384, 1 << 20])
def test_a_literal_of_any_length_reads_back_with_hpacks_own_decoder(length: int) -> None:
    from hpack import Decoder

    name, value = b"x-" + b"n" * (length % 300), b"v" * length  # both short and long names
    decoder = Decoder()
    decoder.max_header_list_size = 2 << 20
    assert decoder.decode(literal(name, value), raw=True) == [(name, value)]
