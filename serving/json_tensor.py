"""Tensors in TF Serving's REST JSON, read and written as ``util/json_tensor.cc`` does.

Reading (``FillPredictRequestFromJson``): each value must be of the JSON type its signature's dtype
takes (a number for float and double, an integer in range for the integer types, true or false
for bool, a string or ``{"b64": ...}`` for string); lists must be dense, and every instance of
the row format must have one shape. Writing (``MakeJsonFromTensors``, ``WriteDecimal``): floats
as ``absl::StrCat`` prints them (six significant digits when that reads back as the same value,
else all of them), whole numbers with ``.0``, ``NaN``/``Infinity``/``-Infinity``, and string
outputs named ``*_bytes`` as ``{"b64": ...}``.

Written here rather than with ``json``/``numpy`` coercion, which accepts "1.5" for a float and
truncates 1.5 for an int, and prints a float32 0.2 as 0.20000000298023224. It imports no
TensorFlow: the logging gateway reads REST calls with it too.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any

import numpy as np

from mnist_client._generated.tensorflow.core.framework import types_pb2
from mnist_client.tensors import MAX_RANK

DEBUG_BYTES = 256  # kMaxJsonDebugStringBytes
BYTES_SUFFIX = "_bytes"  # kBytesTensorNameSuffix
# the integers rapidjson's IsInt, IsInt64, IsUint, IsUint64 take for each integer dtype
INTEGER_RANGES = {types_pb2.DT_INT32: (-2**31, 2**31), types_pb2.DT_INT16: (-2**31, 2**31),
                  types_pb2.DT_INT8: (-2**31, 2**31), types_pb2.DT_UINT8: (-2**31, 2**31),
                  types_pb2.DT_INT64: (-2**63, 2**63), types_pb2.DT_UINT32: (0, 2**32),
                  types_pb2.DT_UINT64: (0, 2**64)}
NUMPY_TYPES = {types_pb2.DT_FLOAT: np.float32, types_pb2.DT_DOUBLE: np.float64, types_pb2.DT_INT32: np.int32,
               types_pb2.DT_INT16: np.int16, types_pb2.DT_INT8: np.int8, types_pb2.DT_UINT8: np.uint8,
               types_pb2.DT_INT64: np.int64, types_pb2.DT_UINT32: np.uint32, types_pb2.DT_UINT64: np.uint64,
               types_pb2.DT_BOOL: np.bool_, types_pb2.DT_STRING: object}
FAST_DTYPES = {types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, *INTEGER_RANGES}
NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
WRITTEN_DTYPES = {np.dtype(t) for t in (np.float32, np.float64, np.int32, np.int16, np.int8, np.uint8, np.int64,
                                       np.uint32, np.uint64, np.bool_, object)}


class JsonTensorError(ValueError):
    """A body json_tensor.cc refuses, with its message and status (INVALID_ARGUMENT unless said)."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT"):
        super().__init__(message)
        self.code = code


def dtype_name(dtype: int) -> str:
    """``DataTypeString``: DT_FLOAT -> float."""
    return types_pb2.DataType.Name(dtype)[3:].lower() if dtype in types_pb2.DataType.values() else str(dtype)


# --- reading ----------------------------------------------------------------------------------
def parse_document(body: bytes) -> Any:
    """The body's first JSON value (rapidjson's kParseStopWhenDoneFlag: what follows it is ignored)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise JsonTensorError(f"JSON Parse error: Invalid encoding in string. at offset: {error.start}") from None
    start = len(text) - len(text.lstrip(" \t\n\r"))
    if start == len(text):
        raise JsonTensorError("JSON Parse error: The document is empty")
    try:
        return json.JSONDecoder().raw_decode(text, start)[0]
    except json.JSONDecodeError as error:
        raise JsonTensorError(f"JSON Parse error: {rapidjson_message(error)} at offset: {error.pos}") from None
    except RecursionError:  # rapidjson parses iteratively; Python's parser has a depth limit
        raise JsonTensorError("JSON Parse error: the document nests too deeply to be read here") from None


# Python's json messages -> rapidjson's GetParseError_En, which TF Serving's parse errors quote
RAPIDJSON_MESSAGES = {
    "Expecting value": "Invalid value.",
    "Expecting property name enclosed in double quotes": "Missing a name for object member.",
    "Expecting ':' delimiter": "Missing a colon after a name of object member.",
    "Unterminated string starting at": "Missing a closing quotation mark in string.",
    "Invalid \\escape": "Invalid escape character in string.",
    "Invalid \\uXXXX escape": "Incorrect hex digit after \\u escape in string.",
    "Invalid control character at": "Invalid encoding in string.",
}


def rapidjson_message(error: json.JSONDecodeError) -> str:
    if error.msg == "Expecting ',' delimiter":
        return ("Missing a comma or '}' after an object member." if innermost_bracket(error.doc, error.pos) == "{"
                else "Missing a comma or ']' after an array element.")
    return RAPIDJSON_MESSAGES.get(error.msg, error.msg)


def innermost_bracket(text: str, end: int) -> str:
    """The bracket still open at ``end`` (strings skipped): which kind of list a comma was missing from."""
    stack, in_string, escaped = [], False, False
    for char in text[:end]:
        if in_string:
            in_string, escaped = (escaped or char != '"'), (not escaped and char == "\\")
        elif char == '"':
            in_string = True
        elif char in "[{":
            stack.append(char)
        elif char in "]}" and stack:
            stack.pop()
    return stack[-1] if stack else ""


def debug_string(value: Any) -> str:
    """``JsonValueToDebugString``: compact JSON, cut after the token that passes 256 bytes."""
    out: list[str] = []
    size = 0
    for token in debug_tokens(value, ""):
        if size >= DEBUG_BYTES:
            break
        out.append(token)
        size += len(token.encode())
    return "".join(out)


def debug_tokens(value: Any, prefix: str):
    if isinstance(value, dict):
        yield prefix + "{"
        for index, (key, item) in enumerate(value.items()):
            yield ("," if index else "") + json.dumps(key, ensure_ascii=False)
            yield from debug_tokens(item, ":")
        yield "}"
    elif isinstance(value, list):
        yield prefix + "["
        for index, item in enumerate(value):
            yield from debug_tokens(item, "," if index else "")
        yield "]"
    elif isinstance(value, float) and math.isfinite(value):
        yield prefix + re.sub(r"e([+-])0*(\d)", lambda m: "e" + m[1].replace("+", "") + m[2], repr(value))
    else:
        yield prefix + json.dumps(value, ensure_ascii=False)


def json_type(value: Any) -> str:
    """``JsonTypeString``."""
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "True" if value else "False"
    return {dict: "Object", list: "Array", str: "String"}.get(type(value), "Number")


def type_error(value: Any, dtype: int) -> JsonTensorError:
    return JsonTensorError(f"JSON Value: {debug_string(value)} Type: {json_type(value)} "
                           f"is not of expected type: {dtype_name(dtype)}")


def is_base64_object(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def decode_base64(value: Any) -> bytes:
    if not is_base64_object(value):
        raise JsonTensorError(f"JSON Value: {debug_string(value)} not formatted correctly for base64 data")
    try:  # absl::Base64Unescape takes padded or unpadded text
        text = value["b64"]
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise JsonTensorError("Unable to base64 decode") from None


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
            flat = np.array([float_or_infinity(v) for v in values], dtype=np.float64).astype(NUMPY_TYPES[dtype])
    elif dtype in INTEGER_RANGES:  # int_val cast to the narrower type, as C casts it
        flat = np.array(values, dtype=np.uint64 if dtype == types_pb2.DT_UINT64 else np.int64).astype(
            NUMPY_TYPES[dtype])
    else:
        flat = np.array(values, dtype=np.bool_)
    return flat.reshape(shape)


def float_or_infinity(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer literal beyond a double, which rapidjson reads as infinite
        return math.copysign(math.inf, value)


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
            return np.array(flat, dtype=wide).astype(NUMPY_TYPES[dtype]).reshape(cells.shape)
        if not kinds <= {int, float}:
            return None
        with np.errstate(over="ignore"):  # rapidjson's GetFloat: the double, cast
            return np.array(flat, dtype=np.float64).astype(NUMPY_TYPES[dtype]).reshape(cells.shape)
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


def format_error(document: Any, message: str) -> JsonTensorError:
    return JsonTensorError(f"JSON Value: {debug_string(document)} {message}")


def read_document(body: bytes) -> dict[str, Any]:
    """``ParseJson`` and ``FillSignature``: an object whose signature_name, if any, is a string."""
    document = parse_document(body)
    if not isinstance(document, dict):
        raise format_error(document, "Is not object")
    if not isinstance(document.get("signature_name", ""), str):
        raise format_error(document, "not formatted correctly. 'signature_name' key must be a string value.")
    return document


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


# --- Examples, for Classify and Regress ------------------------------------------------------------
FEATURE_KINDS = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64"}


def feature_value(value: Any, name: str) -> tuple[str, Any]:
    """The feature kind a JSON value makes (integers and true/false int64, other numbers float,
    strings and b64 objects bytes), and the value as that kind holds it."""
    if isinstance(value, bool):
        return "int64_list", int(value)
    if isinstance(value, str):
        return "bytes_list", value.encode()
    if is_base64_object(value):
        return "bytes_list", decode_base64(value)
    if isinstance(value, float):
        return "float_list", value
    if isinstance(value, int):  # beyond int64 and uint64, rapidjson holds a double
        return ("int64_list", value) if -2**63 <= value < 2**64 else ("float_list", float_or_infinity(value))
    raise JsonTensorError(f"Feature: {name} has element with unexpected JSON type: {json_type(value)}")


def add_value_to_feature(value: Any, name: str, feature: Any) -> None:
    """``AddValueToFeature``: a feature's kind is its first value's; later values must be of it."""
    kind, stored = feature_value(value, name)
    held = feature.WhichOneof("kind")
    if held not in (None, kind):
        raise JsonTensorError(f"Unexpected element type in feature: {name} expecting type: {FEATURE_KINDS[held]}")
    if kind == "int64_list" and stored >= 2**63:
        raise JsonTensorError(f"Feature: {name} has uint64_t element. Only int64_t is supported.")
    getattr(feature, kind).value.append(stored)


def fill_example(value: Any, example: Any) -> None:
    """``MakeExampleFromJsonObject`` into ``example`` (TensorFlow's Example class, or the client's)."""
    if not isinstance(value, dict):
        raise JsonTensorError(f"Example must be JSON object but got JSON {json_type(value)}")
    for name, content in value.items():
        feature = example.features.feature[name]
        for item in content if isinstance(content, list) else [content]:
            add_value_to_feature(item, name, feature)


def fill_examples_request(document: dict[str, Any], request: Any) -> None:
    """``FillClassifyRegressRequestFromJson`` after the signature: the context first, then the examples."""
    with_context = "context" in document
    if with_context:
        fill_example(document["context"], request.input.example_list_with_context.context)
    if "examples" not in document:  # "classify" for :regress too: TF Serving's own message
        raise format_error(document, "When method is classify, key 'examples' is expected and was not found")
    examples = document["examples"]
    if not isinstance(examples, list):
        raise format_error(document, "Expecting 'examples' value to be an list/array")
    if not examples:
        raise format_error(document, "'examples' value is an empty array")
    target = request.input.example_list_with_context if with_context else request.input.example_list
    for value in examples:
        fill_example(value, target.examples.add())


# --- writing ----------------------------------------------------------------------------------
def decimal_texts(array: np.ndarray) -> list[str]:
    """``WriteDecimal`` of each value: ``%g``, or ``max_digits10`` digits when ``%g`` does not read
    back as the same value; ``.0`` after a whole number; NaN, Infinity, -Infinity."""
    values = array.ravel()
    floats = values.tolist()
    texts = ["%g" % value for value in floats]
    with np.errstate(over="ignore", invalid="ignore"):
        read_back = np.array(texts, dtype=values.dtype)  # numpy reads "nan" and "inf" too
    digits = 9 if values.dtype == np.float32 else 17
    for index in np.flatnonzero((read_back != values) & np.isfinite(values)).tolist():
        texts[index] = "%.*g" % (digits, floats[index])
    for index, text in enumerate(texts):
        if "." not in text and "e" not in text:
            texts[index] = NON_FINITE.get(text, text + ".0")
    return texts


def value_texts(array: np.ndarray, name: str) -> list[str]:
    """``AddSingleValueAndAdvance`` of every value, flat."""
    if array.dtype not in WRITTEN_DTYPES:
        raise JsonTensorError(f"Failed to write JSON value for tensor type: {array.dtype.name}")
    if array.dtype.kind == "f":
        return decimal_texts(array)
    if array.dtype == np.bool_:
        return ["true" if value else "false" for value in array.ravel().tolist()]
    if array.dtype == object:
        if name.endswith(BYTES_SUFFIX):
            return ['{"b64": "%s"}' % base64.b64encode(value).decode() for value in array.ravel().tolist()]
        return [json.dumps(value.decode(errors="replace"), ensure_ascii=False) for value in array.ravel().tolist()]
    return [str(value) for value in array.ravel().tolist()]


def nested(texts: list[str], shape: tuple[int, ...]) -> str:
    """Values in row-major order as nested JSON lists of ``shape`` (a scalar when it has none)."""
    if not shape:
        return texts[0]
    if len(shape) == 1:
        return "[" + ", ".join(texts) + "]"
    step = len(texts) // shape[0] if shape[0] else 0
    return "[" + ", ".join(nested(texts[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])) + "]"


def key(name: str) -> str:
    return json.dumps(name, ensure_ascii=False)


def predict_body(outputs: dict[str, np.ndarray], rows: bool) -> str:
    """``MakeJsonFromTensors``: {"predictions": [...]} for the row format, {"outputs": ...} for the
    columnar; several outputs are objects keyed by name."""
    if not outputs:
        raise JsonTensorError("Cannot convert empty tensor map to JSON")
    if not rows:
        written = {name: nested(value_texts(array, name), array.shape) for name, array in outputs.items()}
        if len(written) == 1:
            return '{"outputs": %s}' % next(iter(written.values()))
        return '{"outputs": {%s}}' % ", ".join(f"{key(name)}: {text}" for name, text in written.items())
    batch = -1
    for name, array in outputs.items():
        if array.ndim == 0:
            raise JsonTensorError(f"Tensor name: {name} has no shape information ")
        if batch >= 0 and array.shape[0] != batch:
            raise JsonTensorError(f"Tensor name: {name} has inconsistent batch size: {array.shape[0]} "
                                  f"expecting: {batch}")
        batch = array.shape[0]
    items = {name: [nested(value_texts(array[index], name), array.shape[1:]) for index in range(batch)]
             for name, array in outputs.items()}
    if len(items) == 1:
        return '{"predictions": [%s]}' % ", ".join(next(iter(items.values())))
    return '{"predictions": [%s]}' % ", ".join(
        "{" + ", ".join(f"{key(name)}: {texts[index]}" for name, texts in items.items()) + "}"
        for index in range(batch))


def classify_body(results: list[list[tuple[str, float]]]) -> str:
    """``MakeJsonFromClassificationResult``: {"results": [[[label, score], ...], ...]}."""
    if not results:
        raise JsonTensorError("Cannot convert empty ClassificationResults to JSON")
    written = []
    for classes in results:
        scores = decimal_texts(np.array([score for _, score in classes], dtype=np.float32))
        written.append("[" + ", ".join(f"[{key(label)}, {score}]" for (label, _), score in zip(classes, scores)) + "]")
    return '{"results": [%s]}' % ", ".join(written)


def regress_body(values: list[float]) -> str:
    """``MakeJsonFromRegressionResult``: {"results": [value, ...]}."""
    if not values:
        raise JsonTensorError("Cannot convert empty RegressionResults to JSON")
    return '{"results": [%s]}' % ", ".join(decimal_texts(np.array(values, dtype=np.float32)))
