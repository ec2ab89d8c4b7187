"""TF Serving's REST answers, written as ``util/json_tensor.cc`` writes them
(``MakeJsonFromTensors``, ``MakeJsonFromClassificationResult``, ``MakeJsonFromRegressionResult``,
``WriteDecimal``): floats as ``absl::StrCat`` prints them (six significant digits when that reads
back as the same value, else all of them), whole numbers with ``.0``, ``NaN``/``Infinity``/
``-Infinity``, and string outputs named ``*_bytes`` as ``{"b64": ...}``.

Written here: ``json.dumps`` prints a float32 0.2 as 0.20000000298023224, and no library writes
TF Serving's float text. (The layout is one line; TF Serving's rapidjson pretty-prints.)"""

from __future__ import annotations

import base64
import json

import numpy as np

from serving.protocol.json_document import JsonTensorError

BYTES_SUFFIX = "_bytes"  # kBytesTensorNameSuffix
NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
WRITTEN_DTYPES = {np.dtype(t) for t in (np.float32, np.float64, np.int32, np.int16, np.int8, np.uint8, np.int64,
                                       np.uint32, np.uint64, np.bool_, object)}


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
