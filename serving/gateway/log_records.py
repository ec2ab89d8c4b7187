"""What a logged call becomes: an index entry and TF Serving's ``PredictionLog`` record, the
record written around the messages' own bytes as they crossed the wire."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from mnist_client.protos import logging_pb2, predict_pb2
from storage.errors import MnistError
from storage.logs import MAX_LOGGED_EXAMPLES, LogEntry


@dataclass
class Call:
    """One answered Predict, as the gateway saw it. gRPC: the parsed request (its model spec and
    size), the version that answered and both messages' bytes as they crossed the wire (logged
    as they are, never re-encoded). REST: the JSON bodies and the path's model spec in ``rest``."""

    request_id: str
    api: str  # "grpc" or "rest"
    request: predict_pb2.PredictRequest | None = None
    request_bytes: bytes = b""
    response_bytes: bytes = b""
    version: int | None = None
    rest: dict[str, Any] | None = None
    time: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    client_request_id: str = ""  # the caller's own id, kept beside the gateway's

    @property
    def size(self) -> int:
        """Bytes of messages the call holds while it waits to be written."""
        rest = self.rest or {}
        return (len(self.request_bytes) + len(self.response_bytes) + len(rest.get("request") or b"")
                + len(rest.get("response") or b""))


class Unloggable(MnistError, ValueError):
    """A call that cannot be written as a PredictionLog (e.g. a REST body of another shape)."""

    status = "INVALID_ARGUMENT"


def log_record(call: Call, sample_rate: float,
               to_messages: Callable[[Call], tuple[predict_pb2.PredictRequest, predict_pb2.PredictResponse]]
               ) -> tuple[LogEntry, list[bytes]]:
    """The call's index entry and its PredictionLog record, as the pieces it is written from; a REST
    call's messages are built from its JSON first (``to_messages``)."""
    if call.rest is not None:  # REST: TF Serving's messages built from the JSON
        request, response = to_messages(call)
        call.request, call.version = request, response.model_spec.version.value
        call.request_bytes, call.response_bytes = request.SerializeToString(), response.SerializeToString()
    if call.request is None:
        raise ValueError("a gRPC call without its parsed request")
    spec = call.request.model_spec
    examples = examples_in(call.request)
    if examples > MAX_LOGGED_EXAMPLES:  # no reader would take its entry: not logged, and counted
        raise Unloggable(f"{examples} images, more than the {MAX_LOGGED_EXAMPLES} a log entry holds")
    entry = LogEntry(call.request_id, call.time.isoformat(timespec="milliseconds"), call.version,
                     spec.version_label, call.api, examples, call.client_request_id)
    metadata = logging_pb2.LogMetadata()
    metadata.model_spec.CopyFrom(spec)  # as asked (a label, a version or neither)
    if entry.version is not None and not spec.version_label:
        metadata.model_spec.version.value = entry.version  # the answer says which, too
    metadata.sampling_config.sampling_rate = sample_rate
    metadata.timestamp_secs = int(call.time.timestamp())
    return entry, prediction_log(metadata.SerializeToString(), call.request_bytes, call.response_bytes)


def request_outline(request: predict_pb2.PredictRequest) -> predict_pb2.PredictRequest:
    """The request's model spec and its inputs' types and shapes, not their values: what a log
    index needs, where the parsed request would hold a second copy of the payload while it waits."""
    outline = predict_pb2.PredictRequest()
    outline.model_spec.CopyFrom(request.model_spec)
    for name, tensor in request.inputs.items():
        outline.inputs[name].dtype = tensor.dtype
        outline.inputs[name].tensor_shape.CopyFrom(tensor.tensor_shape)
    return outline


def examples_in(request: predict_pb2.PredictRequest) -> int:
    """Images in a request: the first dimension of its (first) input."""
    for tensor in request.inputs.values():
        dims = tensor.tensor_shape.dim
        return int(dims[0].size) if dims else 1
    return 0


# PredictionLog's wire format, written around the messages' own bytes: re-encoding a logged request
# of 256 images through message objects costs three times as much CPU, beside the requests, and
# joining the pieces into one bytes object copies the megabyte twice more; the log file is written
# from the pieces. Fields: PredictionLog.log_metadata = 1, .predict_log = 6; PredictLog.request = 1,
# .response = 2.
def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def field_header(number: int, size: int) -> bytes:
    """A length-delimited field's tag and length, which ``size`` bytes of payload follow."""
    return varint(number << 3 | 2) + varint(size)


def prediction_log(metadata: bytes, request: bytes, response: bytes) -> list[bytes]:
    """A serialized PredictionLog with a PredictLog of the given (serialized) messages, as the
    pieces it is the concatenation of."""
    request_field, response_field = field_header(1, len(request)), field_header(2, len(response))
    predict_log_size = len(request_field) + len(request) + len(response_field) + len(response)
    return [field_header(1, len(metadata)) + metadata + field_header(6, predict_log_size) + request_field,
            request, response_field, response]
