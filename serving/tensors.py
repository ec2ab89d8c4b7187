"""TensorProto <-> numpy for float32, via ``tensor_content`` bytes.

Shared by the server and the client. Packing raw bytes is far cheaper than
``float_val`` lists or ``tf.make_tensor_proto`` (no TensorFlow import needed).
"""

from __future__ import annotations

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2


class TensorError(ValueError):
    """A TensorProto that cannot be read as the float32 tensor it claims to be."""


def to_tensor_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    contiguous = np.ascontiguousarray(array, dtype=np.float32)
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in contiguous.shape]),
        tensor_content=contiguous.tobytes())


def shape_of(proto: tensor_pb2.TensorProto) -> tuple[int, ...]:
    return tuple(dim.size for dim in proto.tensor_shape.dim)


def from_tensor_proto(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """A float32 array from ``tensor_content`` or ``float_val``; raises TensorError."""
    if proto.dtype != types_pb2.DT_FLOAT:
        raise TensorError(f"dtype {types_pb2.DataType.Name(proto.dtype)}, expected DT_FLOAT")
    shape = shape_of(proto)
    count = int(np.prod(shape)) if shape else 1
    if proto.tensor_content:
        if len(proto.tensor_content) != 4 * count:
            raise TensorError(f"tensor_content has {len(proto.tensor_content)} bytes, shape {list(shape)} "
                              f"needs {4 * count}")
        return np.frombuffer(proto.tensor_content, dtype=np.float32).reshape(shape)
    if len(proto.float_val) != count:
        raise TensorError(f"float_val has {len(proto.float_val)} values, shape {list(shape)} needs {count}")
    return np.asarray(proto.float_val, dtype=np.float32).reshape(shape)
