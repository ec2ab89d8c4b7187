"""The calls the gateway's relay reads (``Watch``), as it keeps them (``Exchange``, ``Body``), and
the one message a unary call's body holds."""

from __future__ import annotations

import gzip
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable


class Body:
    """A call's body as its DATA frames brought it: views of the frames, joined once, when read."""

    def __init__(self) -> None:
        self.parts: list[memoryview] = []
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, data: memoryview) -> None:
        self.parts.append(data)
        self.size += len(data)

    def clear(self) -> None:
        self.parts.clear()
        self.size = 0

    def head(self, count: int) -> bytes:
        """The first ``count`` bytes (fewer if the body is shorter)."""
        out = bytearray()
        for part in self.parts:
            out += part[:count - len(out)]
            if len(out) == count:
                break
        return bytes(out)

    def tail(self, skip: int) -> bytes:
        """The body past its first ``skip`` bytes, in one copy."""
        pieces = []
        for part in self.parts:
            pieces.append(part[skip:] if skip else part)
            skip = max(0, skip - len(part))
        return b"".join(pieces)


@dataclass
class Exchange:
    """One watched call: its request id, the caller's own (if it sent one) and both bodies as they
    crossed the wire."""
    request_id: str
    client_request_id: str | None = None
    started: float = field(default_factory=time.perf_counter)
    request: Body = field(default_factory=Body)
    response: Body = field(default_factory=Body)
    request_encoding: bytes = b"identity"
    response_encoding: bytes = b"identity"
    oversized: bool = False


@dataclass(frozen=True)
class Watch:
    """Which calls the relay reads, and what it does with them."""
    path: bytes  # the :path of the calls watched, e.g. b"/tensorflow.serving.PredictionService/Predict"
    id_header: bytes  # the header that carries a call's id, both ways (b"x-request-id")
    request_id: Callable[[str | None], str]  # the caller's id header (or None) -> the call's id
    finished: Callable[[Exchange, int, str], None]  # (call, grpc-status, grpc-message), on the relay's loop
    max_message_bytes: int = 64 << 20


def grpc_message(body: Body, encoding: bytes) -> bytes | None:
    """The one message of a unary call's body (gRPC's 5-byte length prefix), decompressed; None
    when it is not whole or not readable."""
    prefix = body.head(5)
    if len(prefix) < 5:
        return None
    length = int.from_bytes(prefix[1:5], "big")
    if len(body) - 5 < length:
        return None
    message = body.tail(5)
    if len(message) > length:
        message = message[:length]
    if not prefix[0]:
        return message
    try:
        if encoding == b"gzip":
            return gzip.decompress(message)
        if encoding == b"deflate":
            return zlib.decompress(message)
    except (OSError, zlib.error, EOFError):
        pass
    return None
