"""Examples for Classify and Regress in TF Serving's REST JSON, read as ``util/json_tensor.cc``'s
``FillClassifyRegressRequestFromJson`` reads them: a feature's kind is its first value's
(integers and true/false int64, other numbers float, strings and b64 objects bytes)."""

from __future__ import annotations

from typing import Any

from serving.protocol.json_document import (
    JsonTensorError,
    decode_base64,
    float_or_infinity,
    format_error,
    is_base64_object,
    json_type,
)

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
