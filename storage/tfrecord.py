"""TFRecord framing without TensorFlow, so the logging gateway stays a light sidecar.

Each record is ``uint64 length | uint32 masked crc32c(length) | data | uint32 masked crc32c(data)``,
little-endian, as ``tensorflow/core/lib/io/record_writer.cc`` writes it; ``tf.data.TFRecordDataset``
reads what this writes (tests/serving/gateway/test_gateway.py checks it). The CRC is google-crc32c's.

A file may be compressed whole, as TensorFlow's ``GZIP`` compression type writes it
(``TFRecordDataset(path, compression_type="GZIP")`` reads it back).

Writers take each record as the pieces it is the concatenation of (a logged request's bytes
as they arrived, between a few bytes of framing): a megabyte request is hashed and compressed
where it lies, never copied into a record first.
"""

from __future__ import annotations

import struct
import zlib
from typing import Iterable, Iterator, Sequence

import google_crc32c
from isal import isal_zlib

from storage.errors import MnistError

GZIP = "GZIP"  # TensorFlow's name for the compression type
MASK_DELTA = 0xA282EAD8
GZIP_WBITS = 31  # zlib's way of asking for a gzip header and trailer

Pieces = Sequence[bytes]  # one record: the concatenation of these


class TFRecordError(MnistError, ValueError):
    """Bytes that are not a well-formed TFRecord file."""


def mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + MASK_DELTA) & 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    return mask(google_crc32c.value(data))


def framed(record: Pieces) -> Iterator[bytes]:
    """One record's frame, in order: its header, its pieces as they are, its CRC."""
    length = struct.pack("<Q", sum(len(piece) for piece in record))
    crc = 0
    for piece in record:
        crc = google_crc32c.extend(crc, piece)
    yield length + struct.pack("<I", masked_crc(length))
    yield from record
    yield struct.pack("<I", mask(crc))


def encode(records: Iterable[Pieces]) -> bytes:
    return b"".join(chunk for record in records for chunk in framed(record))


def encode_gzipped(records: Iterable[Pieces]) -> tuple[bytes, int]:
    """A TFRecord file of ``records`` as one gzip member, and the file's size before compression.
    ISA-L's deflate (level 1) costs a fifth of zlib's CPU at its level-1 ratio (about 10:1 on
    logged digits), and releases the GIL while it runs."""
    compressor = isal_zlib.compressobj(1, isal_zlib.DEFLATED, GZIP_WBITS)
    parts, size = [], 0
    for record in records:
        for chunk in framed(record):
            size += len(chunk)
            parts.append(compressor.compress(chunk))
    parts.append(compressor.flush())
    return b"".join(parts), size


def gunzipped(data: bytes, size: int) -> bytes:
    """The ``size`` bytes one gzip member holds. A member that inflates to more is refused
    after ``size + 1`` bytes, never inflated further."""
    inflate = zlib.decompressobj(wbits=GZIP_WBITS)
    try:
        inflated = inflate.decompress(data, size + 1)
    except zlib.error as error:
        raise TFRecordError(f"not a gzip stream: {error}") from None
    if len(inflated) != size or not inflate.eof or inflate.unused_data:
        raise TFRecordError(f"the gzip stream does not hold exactly the {size} bytes expected")
    return inflated


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
