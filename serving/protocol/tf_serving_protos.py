"""TF Serving config messages that the tensorflow-serving-api wheel does not ship.

``SSLConfig`` (ssl_config.proto), ``BatchingParameters`` (session_bundle_config.proto)
and ``MonitoringConfig`` (monitoring_config.proto) are declared here with TF
Serving's field names and types, so the same text files work with
``tensorflow_model_server`` and are checked by ``text_format.Parse`` here.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TypeVar

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)

STRING, BOOL, INT64, MESSAGE = 9, 8, 3, 11
OPTIONAL, REPEATED = 1, 3

# message name -> [(field name, type, label, message type name)]
MESSAGES: dict[str, list[tuple[str, int, int, str | None]]] = {
    "SSLConfig": [("server_key", STRING, OPTIONAL, None), ("server_cert", STRING, OPTIONAL, None),
                  ("custom_ca", STRING, OPTIONAL, None), ("client_verify", BOOL, OPTIONAL, None)],
    "BatchingParameters": [
        ("max_batch_size", MESSAGE, OPTIONAL, ".google.protobuf.Int64Value"),
        ("batch_timeout_micros", MESSAGE, OPTIONAL, ".google.protobuf.Int64Value"),
        ("max_enqueued_batches", MESSAGE, OPTIONAL, ".google.protobuf.Int64Value"),
        ("num_batch_threads", MESSAGE, OPTIONAL, ".google.protobuf.Int64Value"),
        ("thread_pool_name", MESSAGE, OPTIONAL, ".google.protobuf.StringValue"),
        ("allowed_batch_sizes", INT64, REPEATED, None),
        ("pad_variable_length_inputs", BOOL, OPTIONAL, None)],
    "PrometheusConfig": [("enable", BOOL, OPTIONAL, None), ("path", STRING, OPTIONAL, None)],
    "MonitoringConfig": [("prometheus_config", MESSAGE, OPTIONAL, ".tensorflow.serving.PrometheusConfig")],
}


@cache
def message_class(name: str) -> type:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    proto = descriptor_pb2.FileDescriptorProto(name="mnist_tf_serving_configs.proto", package="tensorflow.serving",
                                               syntax="proto3", dependency=["google/protobuf/wrappers.proto"])
    for message_name, fields in MESSAGES.items():
        message = proto.message_type.add(name=message_name)
        for number, (field_name, kind, label, type_name) in enumerate(fields, start=1):
            field = message.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = type_name
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{name}"))


def read_text_proto(path: Path, message: M) -> M:
    """A TF Serving config file read into ``message`` (``ParseProtoTextFile``); a ValueError in
    TF Serving's words when it is not one: the parser's line, as protobuf logs it there, and
    "Invalid protobuf file"."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: {getattr(error, 'strerror', None) or error}") from None
    try:
        return text_format.Parse(text, message)
    except text_format.ParseError as error:
        raise ValueError(f"Error parsing text-format {message.DESCRIPTOR.full_name}: {str(error).rstrip('.')}. "
                         f"Invalid protobuf file: '{path}'") from None
