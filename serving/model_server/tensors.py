"""The client's TensorProto <-> numpy conversions over TensorFlow's own TensorProto, for the server
(whose servicers take and give tensorflow-serving-api's messages). One implementation: ``mnist_client.tensors``."""

from __future__ import annotations

import numpy as np
from tensorflow.core.framework import tensor_pb2

from mnist_client.tensors import TensorError, from_tensor_proto, shape_of  # noqa: F401  re-exported


def to_tensor_proto(array: np.ndarray, as_content: bool = True) -> tensor_pb2.TensorProto:
    from mnist_client.tensors import to_tensor_proto as convert

    return convert(array, as_content, tensor_pb2.TensorProto)
