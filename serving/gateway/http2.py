"""HTTP/2's wire format as the gateway's relay reads and writes it (RFC 9113, RFC 7541): frame
headers, header blocks split into frames, literal header fields, and whole frames cut out of a
byte stream.

Frames come out as views of the bytes read, not copies: slicing and growing buffers frame by
frame cost more CPU than the rest of the relay (``serving/gateway/relay.py``).
"""

from __future__ import annotations

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PUSH_PROMISE, CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x5, 0x9
PING, GOAWAY, WINDOW_UPDATE = 0x6, 0x7, 0x8
NO_ERROR, REFUSED_STREAM = 0x0, 0x7
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_HEADER_TABLE_SIZE = 0x1
FRAME_LIMIT = 16_384  # SETTINGS_MAX_FRAME_SIZE's floor: a frame this size is always allowed


def string_length(length: int) -> bytes:
    """A string literal's length, Huffman bit clear, as a 7-bit prefix integer (RFC 7541 5.1, 5.2).
    Ours because hpack's is private (``hpack.hpack.encode_integer``), and its public ``Encoder``
    would keep table state and cost more per call than the relay's whole header rewrite."""
    if length < 127:
        return bytes((length,))
    rest, tail = length - 127, bytearray((127,))
    while rest >= 128:
        tail.append(rest % 128 + 128)
        rest //= 128
    tail.append(rest)
    return bytes(tail)


def literal(name: bytes, value: bytes) -> bytes:
    """A header field as "Literal Header Field without Indexing, New Name" (RFC 7541 6.2.2)."""
    return b"\x00" + string_length(len(name)) + name + string_length(len(value)) + value


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload


def settings_ack() -> bytes:
    return frame(SETTINGS, ACK, 0, b"")


def ping_ack(payload: memoryview) -> bytes:
    return frame(PING, ACK, 0, bytes(payload))


def window_update(stream: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream, increment.to_bytes(4, "big"))


def reset(stream: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream, code.to_bytes(4, "big"))


def goaway(last_stream: int, code: int = NO_ERROR) -> bytes:
    """"Open no more streams here; those up to ``last_stream`` were seen" (RFC 9113 6.8)."""
    return frame(GOAWAY, 0, 0, last_stream.to_bytes(4, "big") + code.to_bytes(4, "big"))


def grpc_unavailable(stream: int, message: bytes) -> bytes:
    """A trailers-only gRPC response with status UNAVAILABLE (14), as literals that enter no table."""
    fields = ((b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"14"),
              (b"grpc-message", message))
    return header_frames(stream, END_STREAM, b"".join(literal(name, value) for name, value in fields))


def header_frames(stream: int, end_stream: int, block: bytes) -> bytes:
    """A header block as one HEADERS frame and, past the frame size every peer takes, CONTINUATIONs."""
    pieces = [block[at:at + FRAME_LIMIT] for at in range(0, max(len(block), 1), FRAME_LIMIT)]
    frames = [frame(HEADERS if index == 0 else CONTINUATION,
                    (end_stream if index == 0 else 0) | (END_HEADERS if index == len(pieces) - 1 else 0),
                    stream, piece) for index, piece in enumerate(pieces)]
    return b"".join(frames)


def unpadded(kind: int, flags: int, payload: memoryview) -> memoryview:
    """A DATA or HEADERS payload without its padding and, for HEADERS, its priority fields."""
    start, end = 0, len(payload)
    if flags & PADDED and payload:
        start, end = 1, len(payload) - payload[0]
    if kind == HEADERS and flags & PRIORITY:
        start += 5
    return payload[start:max(start, end)]


def header_table_size(payload: memoryview) -> int | None:
    """SETTINGS_HEADER_TABLE_SIZE from a SETTINGS payload, if it sets it."""
    value = None
    for at in range(0, len(payload) - 5, 6):
        if int.from_bytes(payload[at:at + 2], "big") == SETTINGS_HEADER_TABLE_SIZE:
            value = int.from_bytes(payload[at + 2:at + 6], "big")
    return value


Frame = tuple[int, int, int, memoryview, memoryview]  # type, flags, stream, payload, its raw bytes


class FrameReader:
    """Whole frames out of a byte stream, as views of the bytes read."""

    def __init__(self, preface: int = 0):
        self.left = b""  # the start of a frame the last read did not finish
        self.preface = preface  # bytes to pass before the first frame (the client's connection preface)

    def feed(self, data: bytes) -> tuple[bytes, list[Frame]]:
        view = memoryview(b"".join((self.left, data)) if self.left else data)  # bytes: the views stay valid
        at, passed = 0, b""
        if self.preface:
            passed = bytes(view[:self.preface])
            at = len(passed)
            self.preface -= at
        frames = []
        while len(view) - at >= 9:
            end = at + 9 + int.from_bytes(view[at:at + 3], "big")
            if len(view) < end:
                break
            raw = view[at:end]
            frames.append((raw[3], raw[4], int.from_bytes(raw[5:9], "big") & 0x7FFFFFFF, raw[9:], raw))
            at = end
        self.left = bytes(view[at:])
        return passed, frames
