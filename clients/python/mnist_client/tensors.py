"""TensorProto <-> numpy without TensorFlow; the client's, and the server's over TensorFlow's classes.

Writing follows TF Serving: the typed ``*_val`` field by default (``Tensor::AsProtoField``,
what ``mnist_client.py`` reads as ``float_val``), or packed ``tensor_content`` when asked
(``--enable_serialization_as_tensor_content``, ``Tensor::AsProtoTensorContent``).
Reading accepts both, as TensorFlow's ``Tensor::FromProto`` (what TF Serving parses a request
with) does: a typed field with fewer values than the shape holds is filled with its last value
(none: zeros), one with more is cut to the shape; ``tensor_content`` must be exactly its size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mnist_client._generated.tensorflow.core.framework import tensor_pb2, types_pb2


class TensorError(ValueError):
    """A TensorProto that cannot be read as the tensor it claims to be."""


# dtype -> (numpy type, the typed repeated field TF writes it to)
TYPED_FIELDS: dict[int, tuple[type, str]] = {
    types_pb2.DT_FLOAT: (np.float32, "float_val"),
    types_pb2.DT_DOUBLE: (np.float64, "double_val"),
    types_pb2.DT_INT32: (np.int32, "int_val"),
    types_pb2.DT_INT16: (np.int16, "int_val"),
    types_pb2.DT_INT8: (np.int8, "int_val"),
    types_pb2.DT_UINT8: (np.uint8, "int_val"),
    types_pb2.DT_UINT16: (np.uint16, "int_val"),
    types_pb2.DT_INT64: (np.int64, "int64_val"),
    types_pb2.DT_UINT32: (np.uint32, "uint32_val"),
    types_pb2.DT_UINT64: (np.uint64, "uint64_val"),
    types_pb2.DT_BOOL: (np.bool_, "bool_val"),
}
NUMPY_DTYPES = {np.dtype(numpy_type): dtype for dtype, (numpy_type, _) in TYPED_FIELDS.items()}
MAX_FILLED_VALUES = 1 << 24  # the float32 values a 64 MiB message holds
MAX_RANK = 64  # numpy's most dimensions (TensorFlow's TensorShape takes 254)


def to_tensor_proto(array: np.ndarray, as_content: bool = True, proto_class: Any = tensor_pb2.TensorProto) -> Any:
    """A TensorProto of ``array`` (float32 unless it is already a supported dtype, or strings).
    ``as_content`` packs raw bytes (cheapest for requests); otherwise the typed field, as TF Serving
    answers. ``proto_class``: this package's TensorProto, or TensorFlow's (same wire format)."""
    array = np.asarray(array)
    proto = proto_class()
    proto.tensor_shape.dim.extend([type(proto.tensor_shape).Dim(size=size) for size in array.shape])
    if array.dtype.kind in "OSU":
        proto.dtype = types_pb2.DT_STRING
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode() for v in array.ravel())
        return proto
    if array.dtype not in NUMPY_DTYPES:
        array = array.astype(np.float32)
    dtype = NUMPY_DTYPES[array.dtype]
    proto.dtype = dtype
    if as_content:
        proto.tensor_content = np.ascontiguousarray(array).tobytes()
    else:
        getattr(proto, TYPED_FIELDS[dtype][1]).extend(array.ravel().tolist())
    return proto


def shape_of(proto: Any) -> tuple[int, ...]:
    return tuple(dim.size for dim in proto.tensor_shape.dim)


def from_tensor_proto(proto: Any) -> np.ndarray:
    """An array from ``tensor_content`` or the typed field; raises TensorError. A typed field
    shorter than its shape is filled as TensorFlow fills it, up to ``MAX_FILLED_VALUES``: a shape
    read from outside must not make a few bytes into gigabytes."""
    shape = shape_of(proto)
    if any(size < 0 for size in shape):
        raise TensorError(f"shape {list(shape)} has a negative dimension")
    if len(shape) > MAX_RANK:
        raise TensorError(f"a shape of {len(shape)} dimensions: at most {MAX_RANK} are read here")
    count = 1
    for size in shape:  # TensorShape's check, dimension by dimension
        count *= size
        if count >= 2**63:
            raise TensorError(f"shape {list(shape)} overflows an int64 count of values")
    try:
        return read_values(proto, shape, count)
    except TensorError:
        raise
    except (ValueError, MemoryError) as error:  # a shape TensorFlow takes (say 0 x 2**62) numpy cannot hold
        raise TensorError(f"shape {list(shape)} cannot be held here: {error}") from None


def read_values(proto: Any, shape: tuple[int, ...], count: int) -> np.ndarray:
    """The ``count`` values of a shape already checked."""
    if proto.dtype == types_pb2.DT_STRING:
        strings = list(proto.string_val)
        if len(strings) != count:
            strings = fitted(strings, count, b"")
        array = np.empty(count, dtype=object)  # np.array(strings) could read nested shapes into them
        array[:] = strings
        return array.reshape(shape)
    if proto.dtype not in TYPED_FIELDS:
        raise TensorError(f"dtype {types_pb2.DataType.Name(proto.dtype)} is not supported")
    numpy_type, field = TYPED_FIELDS[proto.dtype]
    if proto.tensor_content:
        size = np.dtype(numpy_type).itemsize * count
        if len(proto.tensor_content) != size:
            raise TensorError(f"tensor_content has {len(proto.tensor_content)} bytes, shape {list(shape)} "
                              f"needs {size}")
        return np.frombuffer(proto.tensor_content, dtype=numpy_type).reshape(shape)
    values = getattr(proto, field)
    return np.asarray(values if len(values) == count else fitted(values, count, 0), dtype=numpy_type).reshape(shape)


def fitted(values: Any, count: int, zero: Any) -> list:
    """``FromProtoField``: the first ``count`` values, the last repeated to fill the shape (none: zeros)."""
    if count > MAX_FILLED_VALUES:
        raise TensorError(f"a shape of {count} values, filled from {len(values)} given: more than {MAX_FILLED_VALUES}")
    values = list(values[:count])
    return values + [values[-1] if values else zero] * (count - len(values))
