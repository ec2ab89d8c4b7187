"""Float tensors without numpy: nested lists in, lists of rows out, for a service that installs
the client alone (grpcio and protobuf: about a fifth of the size with numpy). TF Serving's wire
format either way: packed little-endian ``tensor_content`` out, ``float_val`` or content back."""

from __future__ import annotations

import sys
from array import array
from typing import Any, Sequence

from mnist_client._generated.tensorflow.core.framework import tensor_pb2, types_pb2


class ShapeError(ValueError):
    """Nested lists that are not a rectangular block of numbers."""


def nested_shape(value: Any) -> list[int]:
    shape = []
    while isinstance(value, (list, tuple)):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def flatten(value: Any, shape: Sequence[int], out: list[float]) -> None:
    if not shape:
        if isinstance(value, (list, tuple)) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ShapeError(f"expected a number, got {type(value).__name__}")
        out.append(float(value))
        return
    if not isinstance(value, (list, tuple)) or len(value) != shape[0]:
        raise ShapeError(f"ragged nesting: expected {shape[0]} items")
    for item in value:
        flatten(item, shape[1:], out)


def float_tensor(values: Any) -> tensor_pb2.TensorProto:
    """A float32 TensorProto of nested lists (e.g. images [N][28][28][1] in [0,1])."""
    shape = nested_shape(values)
    flat: list[float] = []
    flatten(values, shape, flat)
    packed = array("f", flat)
    if sys.byteorder == "big":
        packed.byteswap()  # TensorFlow's tensor_content is little-endian
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=packed.tobytes())
    proto.tensor_shape.dim.extend(tensor_pb2.TensorProto().tensor_shape.Dim(size=size) for size in shape)
    return proto


def float_rows(proto: Any) -> list[list[float]]:
    """A float32 [N, K] TensorProto as N rows of K floats (from tensor_content or float_val)."""
    if proto.dtype != types_pb2.DT_FLOAT:
        raise ValueError(f"expected a float tensor, got {types_pb2.DataType.Name(proto.dtype)}")
    shape = [dim.size for dim in proto.tensor_shape.dim]
    if len(shape) != 2:
        raise ValueError(f"expected a [N, K] tensor, got shape {shape}")
    if proto.tensor_content:
        values = array("f")
        values.frombytes(proto.tensor_content)
        if sys.byteorder == "big":
            values.byteswap()
    else:
        values = array("f", proto.float_val)
    rows, width = shape
    if len(values) != rows * width:
        raise ValueError(f"{len(values)} values cannot fill shape {shape}")
    return [list(values[index * width:(index + 1) * width]) for index in range(rows)]
