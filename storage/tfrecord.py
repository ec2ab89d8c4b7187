"""TFRecord framing without TensorFlow, so the logging gateway stays a light sidecar.

Each record is ``uint64 length | uint32 masked crc32c(length) | data | uint32 masked crc32c(data)``,
little-endian, as ``tensorflow/core/lib/io/record_writer.cc`` writes it; ``tf.data.TFRecordDataset``
reads what this writes (tests/test_gateway.py checks it). The CRC is google-crc32c's.
"""

from __future__ import annotations

import struct
from typing import Iterable, Iterator

import google_crc32c

MASK_DELTA = 0xA282EAD8


class TFRecordError(ValueError):
    """Bytes that are not a well-formed TFRecord file."""


def masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + MASK_DELTA) & 0xFFFFFFFF


def encode(records: Iterable[bytes]) -> bytes:
    parts = []
    for record in records:
        length = struct.pack("<Q", len(record))
        parts += [length, struct.pack("<I", masked_crc(length)), record, struct.pack("<I", masked_crc(record))]
    return b"".join(parts)


def decode(data: bytes) -> Iterator[bytes]:
    """The records of a TFRecord file, each checked against its CRCs."""
    offset = 0
    while offset < len(data):
        if offset + 12 > len(data):
            raise TFRecordError(f"truncated record header at byte {offset}")
        length_bytes = data[offset:offset + 8]
        (length,) = struct.unpack("<Q", length_bytes)
        (length_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
        if length_crc != masked_crc(length_bytes):
            raise TFRecordError(f"corrupt record length at byte {offset}")
        start, end = offset + 12, offset + 12 + length
        if end + 4 > len(data):
            raise TFRecordError(f"truncated record at byte {offset}")
        record = data[start:end]
        if struct.unpack("<I", data[end:end + 4])[0] != masked_crc(record):
            raise TFRecordError(f"corrupt record data at byte {offset}")
        yield record
        offset = end + 4
