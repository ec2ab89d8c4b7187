"""A REST body as TF Serving's rapidjson reads it, and the words TF Serving's JSON errors use
(``util/json_tensor.cc``: ``ParseJson``, ``FillSignature``, ``JsonValueToDebugString``,
``JsonTypeString``, base64 objects). What the tensor reader, the example reader and the
answers share. No TensorFlow: the logging gateway reads REST calls with it too."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any

from storage.errors import MnistError

DEBUG_BYTES = 256  # kMaxJsonDebugStringBytes


class JsonTensorError(MnistError, ValueError):
    """A body json_tensor.cc refuses, with its message and status (INVALID_ARGUMENT unless said)."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT"):
        super().__init__(message, status=code)
        self.code = code


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
    names: dict[type, str] = {dict: "Object", list: "Array", str: "String"}
    return names.get(type(value), "Number")


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


def float_or_infinity(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer literal beyond a double, which rapidjson reads as infinite
        return math.copysign(math.inf, value)
