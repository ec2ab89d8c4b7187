"""Request tensors in TF Serving's REST JSON, read as ``util/json_tensor.cc``'s
``FillPredictRequestFromJson`` reads them: each value must be of the JSON type its signature's
dtype takes (a number for float and double, an integer in range for the integer types, true or
false for bool, a string or ``{"b64": ...}`` for string); lists must be dense, and every
instance of the row format must have one shape.

Written here rather than with ``json``/``numpy`` coercion, which accepts "1.5" for a float and
truncates 1.5 for an int. A dense list of numbers still goes through numpy when that reading is
certain to be TF Serving's. It imports no TensorFlow: the logging gateway reads REST calls with it too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mnist_client.protos import types_pb2
from mnist_client.tensors import MAX_RANK, TYPED_FIELDS
from serving.protocol.json_document import (
    JsonTensorError,
    debug_string,
    decode_base64,
    float_or_infinity,
    format_error,
    is_base64_object,
    json_type,
)

# the integers rapidjson's IsInt, IsInt64, IsUint, IsUint64 take for each integer dtype
INTEGER_RANGES = {types_pb2.DT_INT32: (-2**31, 2**31), types_pb2.DT_INT16: (-2**31, 2**31),
                  types_pb2.DT_INT8: (-2**31, 2**31), types_pb2.DT_UINT8: (-2**31, 2**31),
                  types_pb2.DT_INT64: (-2**63, 2**63), types_pb2.DT_UINT32: (0, 2**32),
                  types_pb2.DT_UINT64: (0, 2**64)}
FAST_DTYPES = {types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, *INTEGER_RANGES}


def dtypes(tensors: Any) -> dict[str, int]:
    """Name -> dtype of a signature's inputs or outputs (TensorFlow's TensorInfo map, or the client's)."""
    return {name: info.dtype for name, info in tensors.items()}


def numpy_type(dtype: int) -> type:
    """The numpy type a tensor of ``dtype`` is read into, as the TensorProto reader holds it."""
    return TYPED_FIELDS[dtype][0]


def dtype_name(dtype: int) -> str:
    """``DataTypeString``: DT_FLOAT -> float."""
    return types_pb2.DataType.Name(dtype)[3:].lower() if dtype in types_pb2.DataType.values() else str(dtype)


def type_error(value: Any, dtype: int) -> JsonTensorError:
    return JsonTensorError(f"JSON Value: {debug_string(value)} Type: {json_type(value)} "
                           f"is not of expected type: {dtype_name(dtype)}")


def scalar(value: Any, dtype: int) -> Any:
    """``AddValueToTensor``: the value if its JSON type is the one ``dtype`` takes."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if dtype in (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE):
        if not number:
            raise type_error(value, dtype)
        return value
    if dtype in INTEGER_RANGES:
        low, high = INTEGER_RANGES[dtype]
        if not (number and isinstance(value, int) and low <= value < high):
            raise type_error(value, dtype)
        return value
    if dtype == types_pb2.DT_STRING:
        if not isinstance(value, str):
            raise type_error(value, dtype)
        return value.encode()
    if dtype == types_pb2.DT_BOOL:
        if not isinstance(value, bool):
            raise type_error(value, dtype)
        return value
    raise JsonTensorError(f"Conversion of JSON Value: {debug_string(value)} to type: {dtype_name(dtype)}",
                          "UNIMPLEMENTED")


def dense_shape(value: Any) -> list[int]:
    """``GetDenseTensorShape``: the sizes along the first element at each level."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def fill(value: Any, level: int, dtype: int, shape: list[int], out: list[Any]) -> None:
    """``FillTensorProto``: the values of a dense ``shape``, in order, into ``out``."""
    if not isinstance(value, list):
        if level != len(shape):
            raise JsonTensorError(f"JSON Value: {debug_string(value)} found at incorrect level: {level + 1} "
                                  f"in the JSON DOM. Expected at level: {len(shape)}")
        if isinstance(value, dict):
            if dtype != types_pb2.DT_STRING:
                raise type_error(value, dtype)
            out.append(decode_base64(value))
        else:
            out.append(scalar(value, dtype))
        return
    if level >= len(shape):
        raise JsonTensorError(f"Encountered list at unexpected level: {level} expected < {len(shape)}")
    if len(value) != shape[level]:
        raise JsonTensorError(f"Encountered list at unexpected size: {len(value)} at level: {level} "
                              f"expected size: {shape[level]}")
    for item in value:
        fill(item, level + 1, dtype, shape, out)


def as_array(values: list[Any], shape: list[int], dtype: int) -> np.ndarray:
    """The values ``fill`` took, as the tensor TensorFlow makes of them."""
    if dtype == types_pb2.DT_STRING:
        flat = np.empty(len(values), dtype=object)
        flat[:] = values
    elif dtype in (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE):  # GetFloat, GetDouble: the double, cast
        with np.errstate(over="ignore"):
            flat = np.array([float_or_infinity(v) for v in values], dtype=np.float64).astype(numpy_type(dtype))
    elif dtype in INTEGER_RANGES:  # int_val cast to the narrower type, as C casts it
        flat = np.array(values, dtype=np.uint64 if dtype == types_pb2.DT_UINT64 else np.int64).astype(
            numpy_type(dtype))
    else:
        flat = np.array(values, dtype=np.bool_)
    return flat.reshape(shape)


def fast_array(value: Any, dtype: int) -> np.ndarray | None:
    """The tensor by numpy, when that reading is certain to be json_tensor.cc's: a dense list of
    JSON numbers only (no true/false, which numpy would take as 1 and 0), integers in range for an
    integer dtype. Anything else is read value by value, which says what is wrong."""
    if dtype not in FAST_DTYPES:
        return None
    try:
        cells = np.array(value, dtype=object)  # ragged lists mostly stay lists here, and fail the type test
    except ValueError:
        return None
    flat = cells.ravel().tolist()
    kinds = set(map(type, flat))
    try:
        if dtype in INTEGER_RANGES:
            low, high = INTEGER_RANGES[dtype]
            if not kinds <= {int} or (flat and not (low <= min(flat) and max(flat) < high)):
                return None
            wide = np.uint64 if dtype == types_pb2.DT_UINT64 else np.int64
            return np.array(flat, dtype=wide).astype(numpy_type(dtype)).reshape(cells.shape)
        if not kinds <= {int, float}:
            return None
        with np.errstate(over="ignore"):  # rapidjson's GetFloat: the double, cast
            return np.array(flat, dtype=np.float64).astype(numpy_type(dtype)).reshape(cells.shape)
    except OverflowError:
        return None  # an integer beyond a double: read value by value


def tensor(value: Any, dtype: int, max_rank: int = MAX_RANK) -> tuple[np.ndarray, int]:
    """One JSON value as a tensor of ``dtype``, and its value count (``AddInstanceItem``'s size)."""
    shape = dense_shape(value)
    if len(shape) > max_rank:
        raise JsonTensorError(f"a tensor of {len(shape)} dimensions: at most {max_rank} are read here")
    array = fast_array(value, dtype)
    if array is not None:
        return array, array.size
    values: list[Any] = []
    fill(value, 0, dtype, shape, values)
    return as_array(values, shape, dtype), len(values)


def shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(size) for size in shape) + "]"


def is_element_object(value: Any) -> bool:
    return isinstance(value, dict) and not is_base64_object(value)


def batched(items: list[np.ndarray]) -> np.ndarray:
    if items[0].dtype != object:
        return np.stack(items)
    array = np.empty(sum(item.size for item in items), dtype=object)  # strings: np.stack would unpack them
    array[:] = [value for item in items for value in item.ravel().tolist()]
    return array.reshape((len(items), *items[0].shape))


def fast_rows(instances: list[Any], dtypes: dict[str, int]) -> dict[str, np.ndarray] | None:
    """The row format by numpy, when every instance is certain to pass (see ``fast_array``)."""
    if len(dtypes) == 1 and not any(is_element_object(item) for item in instances):
        name, dtype = next(iter(dtypes.items()))
        array = fast_array(instances, dtype)
        return None if array is None else {name: array}
    if not all(is_element_object(item) and item.keys() == dtypes.keys() for item in instances):
        return None
    arrays = {name: fast_array([item[name] for item in instances], dtype) for name, dtype in dtypes.items()}
    return None if any(array is None for array in arrays.values()) else arrays  # type: ignore[return-value]


def read_rows(instances: list[Any], dtypes: dict[str, int]) -> dict[str, np.ndarray]:
    """``FillTensorMapFromInstancesList``: one tensor per input, batched along the instances."""
    if not isinstance(instances[0], dict) and len(dtypes) > 1:
        raise JsonTensorError("instances is a plain list, but expecting list of objects as multiple input tensors "
                              "required as per tensorinfo_map")
    fast = fast_rows(instances, dtypes)
    if fast is not None:
        return fast
    named = is_element_object(instances[0])
    items: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}
    for index, element in enumerate(instances):
        if named and not is_element_object(element):
            raise JsonTensorError(f"Expecting object but got list at item {index} of input list")
        if not named and is_element_object(element):
            raise JsonTensorError(f"Expecting value/list but got object at item {index} of input list")
        pairs = element.items() if named else [(next(iter(dtypes)), element)]
        for name, value in pairs:
            try:
                add_instance_item(value, name, dtypes, items, sizes)
            except JsonTensorError as error:
                where = f"{index} key: {name}" if named else f"{index}"
                raise JsonTensorError(f"Failed to process element: {where} of 'instances' list. "
                                      f"Error: {error.code}: {error}") from None
        if named and element.keys() != dtypes.keys():
            raise JsonTensorError(f"Failed to process element: {index} of 'instances' list. JSON object: "
                                  f"{debug_string(element)} keys must be equal to: {','.join(sorted(dtypes))}")
    return {name: batched(arrays) for name, arrays in items.items()}


def add_instance_item(value: Any, name: str, dtypes: dict[str, int], items: dict[str, list[np.ndarray]],
                      sizes: dict[str, int]) -> None:
    """``AddInstanceItem``: every instance of an input has the first one's size and shape."""
    if name not in dtypes:
        raise JsonTensorError(f"JSON object: does not have named input: {name}")
    array, size = tensor(value, dtypes[name], MAX_RANK - 1)  # the instances add a dimension
    if name not in sizes:
        sizes[name], items[name] = size, [array]
        return
    first = items[name][0]
    if sizes[name] != size:
        raise JsonTensorError(f"Expecting tensor size: {sizes[name]} but got: {size}")
    if first.shape != array.shape:
        raise JsonTensorError(f"Expecting shape {shape_text(first.shape)} but got: {shape_text(array.shape)}")
    items[name].append(array)


def read_columns(value: Any, dtypes: dict[str, int]) -> dict[str, np.ndarray]:
    """``FillTensorMapFromInputsMap``: a plain value for a single input, else an object naming each
    input (other keys are ignored)."""
    if not isinstance(value, dict) or is_base64_object(value):
        if len(dtypes) > 1:
            raise JsonTensorError("inputs is a plain value/list, but expecting an object as multiple input tensors "
                                  "required as per tensorinfo_map")
        name, dtype = next(iter(dtypes.items()))
        return {name: tensor(value, dtype)[0]}
    tensors = {}
    for name, dtype in dtypes.items():
        if name not in value:
            raise JsonTensorError(f"Missing named input: {name} in 'inputs' object.")
        tensors[name] = tensor(value[name], dtype)[0]
    return tensors


def read_predict(document: dict[str, Any], dtypes: dict[str, int], signature_name: str = ""
                 ) -> tuple[dict[str, np.ndarray], bool]:
    """``FillPredictRequestFromJson`` after the signature is known: (tensors by input, row format?)."""
    if not dtypes:
        raise JsonTensorError(f"Failed to get input map for signature: {signature_name or 'DEFAULT'}")
    if "instances" in document and "inputs" in document:
        raise format_error(document, "Not formatted correctly expecting only one of 'inputs' or 'instances' "
                                     "keys to exist ")
    if "instances" in document:
        instances = document["instances"]
        if not isinstance(instances, list):
            raise format_error(document, "Expecting 'instances' to be an list/array")
        if not instances:
            raise format_error(document, "No values in 'instances' array")
        return read_rows(instances, dtypes), True
    if "inputs" in document:
        return read_columns(document["inputs"], dtypes), False
    raise JsonTensorError("Missing 'inputs' or 'instances' key")
