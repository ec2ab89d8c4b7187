"""REST tensors read and written as TF Serving's util/json_tensor.cc does; the cases and expected
values are json_tensor_test.cc's (test names in the docstrings)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mnist_client.protos import types_pb2
from serving.model_server.json_answers import classify_body, predict_body, regress_body
from serving.model_server.json_examples import fill_examples_request
from serving.protocol.json_document import JsonTensorError, read_document
from serving.protocol.json_tensor import read_columns, read_predict

FLOAT, DOUBLE, INT32, STRING, BOOL = (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_INT32,
                                      types_pb2.DT_STRING, types_pb2.DT_BOOL)


def refusal(document: dict, dtypes: dict[str, int]) -> str:
    with pytest.raises(JsonTensorError) as caught:
        read_predict(document, dtypes)
    return str(caught.value)


def test_floats_are_written_as_write_decimal() -> None:
    """FromJsonSingleFloatTensorSixDigitPrecision, FromJsonSingleFloatTensorNonFinite."""
    six = np.array([[9000000, 999999, 0.5], [.0003, .00003, 555557.5]], dtype=np.float32)
    assert predict_body({"float_tensor": six}, rows=True) == (
        '{"predictions": [[9e+06, 999999.0, 0.5], [0.0003, 3e-05, 555557.5]]}')
    non_finite = np.array([[np.nan, np.inf], [3, -np.inf]], dtype=np.float32)
    assert predict_body({"float_tensor": non_finite}, rows=True) == (
        '{"predictions": [[NaN, Infinity], [3.0, -Infinity]]}')
    # a float32 0.2 is "0.2", not its double 0.20000000298023224; what six digits lose, nine keep
    assert predict_body({"y": np.array([0.2, 0.99999785], dtype=np.float32)}, rows=False) == (
        '{"outputs": [0.2, 0.999997854]}')
    written = json.loads(predict_body({"y": np.array([0.99999785], dtype=np.float32)}, rows=False))["outputs"][0]
    assert np.float32(written) == np.float32(0.99999785)  # reads back to the same float32


def test_tensors_of_every_kind_in_rows_and_columns() -> None:
    """FromJsonSingleTensor, FromJsonSingleScalarTensor, FromJsonSingleBytesTensor, MultipleNamedTensor."""
    ints = np.array([[[1, 2], [3, 4], [5, 6]], [[7, 8], [9, 0], [1, 2]]], dtype=np.int32)
    assert json.loads(predict_body({"int_tensor": ints}, rows=True)) == {"predictions": ints.tolist()}
    assert json.loads(predict_body({"int_tensor": ints}, rows=False)) == {"outputs": ints.tolist()}
    assert json.loads(predict_body({"int_tensor": np.arange(1, 6)}, rows=True)) == {"predictions": [1, 2, 3, 4, 5]}
    strings = np.array([[b"hello", b"world"], [b"tf", b"serving"]], dtype=object)
    assert json.loads(predict_body({"str_tensor_bytes": strings}, rows=True)) == {"predictions": [
        [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}], [{"b64": "dGY="}, {"b64": "c2VydmluZw=="}]]}
    assert json.loads(predict_body({"str_tensor": strings}, rows=True)) == {"predictions": [
        ["hello", "world"], ["tf", "serving"]]}
    both = {"ints": np.array([1, 2], dtype=np.int64), "flags": np.array([True, False])}
    assert json.loads(predict_body(both, rows=True)) == {"predictions": [{"ints": 1, "flags": True},
                                                                         {"ints": 2, "flags": False}]}


def test_outputs_that_cannot_be_written() -> None:
    """FromJsonSingleTensorErrors, and the row format's batch-size check."""
    for outputs, message in (({}, "empty tensor map"),
                             ({"t": np.array([1, 2], dtype=np.complex64)}, "tensor type: complex64"),
                             ({"t": np.array(1, dtype=np.int32)}, "no shape information"),
                             ({"a": np.zeros(2), "b": np.zeros(3)}, "inconsistent batch size: 3 expecting: 2")):
        with pytest.raises(JsonTensorError, match=message):
            predict_body(outputs, rows=True)
    with pytest.raises(JsonTensorError, match="empty ClassificationResults"):
        classify_body([])


def test_classify_and_regress_results() -> None:
    """JsonFromClassificationResult, JsonFromRegressionResult(WithNonFinite)."""
    assert classify_body([[("car", 0.2), ("bus", 0.3)], [("bike", 0.4)]]) == (
        '{"results": [[["car", 0.2], ["bus", 0.3]], [["bike", 0.4]]]}')
    assert regress_body([0.2, float("nan"), float("inf")]) == '{"results": [0.2, NaN, Infinity]}'


def test_numbers_are_read_as_the_signature_types() -> None:
    """MixedInputForFloatTensor, MixedInputForDoubleTensor, FloatTensorWithPrecisionLoss,
    FloatTensorThatExceedsMaxReturnsInf, FloatTensorThatExceedsMinReturnsZero."""
    tensors, rows = read_predict({"instances": [1, 2.0, 3, 4, 5.003, 0.007, 0.0]}, {"default": FLOAT})
    assert rows and tensors["default"].dtype == np.float32
    np.testing.assert_array_equal(tensors["default"], np.array([1, 2, 3, 4, 5.003, 0.007, 0], dtype=np.float32))
    doubles = read_predict({"instances": [1.0, 2, 0.662]}, {"default": DOUBLE})[0]["default"]
    assert doubles.dtype == np.float64 and doubles[2] == 0.662
    for value in (1435774380, 1435774380.0):
        assert read_predict({"instances": [value]}, {"default": FLOAT})[0]["default"][0] == np.float32(1435774380)
    extremes = read_predict({"instances": [1.79769e308, -1.79769e308, 2.22507e-308, -2.22507e-308]},
                            {"default": FLOAT})[0]["default"]
    assert extremes.tolist()[:2] == [np.inf, -np.inf] and extremes.tolist()[2:] == [0.0, 0.0]
    assert np.signbit(extremes[3])


def test_strings_and_base64() -> None:
    """SingleUnnamedTensorBase64Scalars, SingleUnnamedTensorBase64Lists, SingleNamedTensorBase64."""
    scalars = read_predict({"instances": [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}]}, {"default": STRING})[0]
    assert scalars["default"].shape == (2,) and scalars["default"].tolist() == [b"hello", b"world"]
    lists = read_predict({"instances": [[{"b64": "aGVsbG8="}], [{"b64": "d29ybGQ="}]]}, {"default": STRING})[0]
    assert lists["default"].shape == (2, 1)
    named = read_predict({"instances": [{"default": [[{"b64": "aGVsbG8="}], [{"b64": "d29ybGQ="}]]}]},
                         {"default": STRING})[0]
    assert named["default"].shape == (1, 2, 1) and named["default"].ravel().tolist() == [b"hello", b"world"]
    assert read_columns({"b64": "aGVsbG8="}, {"default": STRING})["default"].item() == b"hello"
    assert "Unable to base64 decode" in refusal({"instances": [{"b64": "!!"}]}, {"d": STRING})


def test_values_of_the_wrong_type_or_shape_are_refused() -> None:
    """SingleUnnamedTensorErrors, MultipleNamedTensorErrors; and what numpy's reading took before:
    a string or true for a float, 1.5 (truncated) for an int."""
    int_input = {"default": INT32}
    assert "Expecting tensor size" in refusal({"instances": [[1, 2], [3, 4], [5, 6, 7]]}, int_input)
    assert "Expecting shape" in refusal({"instances": [[1, 2], [3, 4], [[5, 6]]]}, int_input)
    assert "Expecting shape" in refusal({"instances": [1, [1]]}, int_input)
    assert "not of expected type" in refusal({"instances": [[1, 2], ["a", "b"]]}, int_input)
    assert "Not formatted correctly" in refusal({"instances": [1], "inputs": [1]}, int_input)
    two = {"int_tensor": INT32, "str_tensor": STRING}
    assert "Expecting object but got list" in refusal(
        {"instances": [{"int_tensor": [1], "str_tensor": ["foo"]}, [1, 20, 30]]}, two)
    assert "Expecting value/list but got object" in refusal(
        {"instances": [["baz", "bar"], {"str_tensor": ["baz", "bat"]}]}, {"str_tensor": STRING})
    assert "keys must be equal to: int_tensor,str_tensor" in refusal({"instances": [{"int_tensor": [1]}]}, two)
    for value, dtypes in (("1.5", {"x": FLOAT}), (True, {"x": FLOAT}), (1.5, {"x": INT32}), (2**31, {"x": INT32}),
                          (None, {"x": FLOAT}), (1, {"x": BOOL}), (1, {"x": STRING})):
        assert "is not of expected type" in refusal({"instances": [value]}, dtypes), value
    assert "is not of expected type: float" in refusal({"instances": [[1.0, True]]}, {"x": FLOAT})
    assert "Encountered list at unexpected size: 1" in refusal({"inputs": [[1, 2], [3]]}, {"x": FLOAT})
    assert "found at incorrect level" in refusal({"inputs": [[1, 2], 3]}, {"x": FLOAT})


def test_document_checks() -> None:
    """SingleUnnamedTensorErrors' document cases; what follows the first JSON value is ignored
    (rapidjson's kParseStopWhenDoneFlag)."""
    assert read_document(b' {"instances": [1]} trailing') == {"instances": [1]}
    for body, message in ((b"", "document is empty"), (b"[1]", "Is not object"),
                          (b'{"signature_name": 5, "instances": [1]}', "must be a string value"),
                          (b"instances = [1, 2]", "JSON Parse error: Invalid value"),
                          (b'  {"instances": [1 2]}', "Missing a comma or ']' after an array element. at offset: 19"),
                          (b'{"instances": ["\xff"]}', "Invalid encoding")):
        with pytest.raises(JsonTensorError, match=message):
            read_document(body)


def test_a_large_batch_is_read_at_numpy_speed() -> None:
    """The row format of 256 MNIST images: the same tensor whether numpy or the careful reading takes it."""
    images = np.random.default_rng(0).random((256, 28, 28, 1), dtype=np.float32)
    document = json.loads(json.dumps({"instances": images.tolist()}))
    read = read_predict(document, {"image": FLOAT})[0]["image"]
    np.testing.assert_array_equal(read, images)
    document["instances"][255][27][27][0] = True  # one bool among the numbers: refused, not read as 1.0
    assert "element: 255" in refusal(document, {"image": FLOAT})


def test_examples_for_classify_and_regress() -> None:
    """ClassifyRegressRequestTest RequestWithContextAndSignature and JsonErrors."""
    from mnist_client.protos import classification_pb2

    request = classification_pb2.ClassificationRequest()
    fill_examples_request({"context": {"query": "pizza", "user_id": [1, 2]},
                           "examples": [{"price": 10.5, "ok": [True, 0], "photo": {"b64": "aGVsbG8="}, "none": []}]},
                          request)
    context = request.input.example_list_with_context.context.features.feature
    assert context["query"].bytes_list.value == [b"pizza"] and context["user_id"].int64_list.value == [1, 2]
    features = request.input.example_list_with_context.examples[0].features.feature
    assert list(features["price"].float_list.value) == [10.5] and list(features["ok"].int64_list.value) == [1, 0]
    assert features["photo"].bytes_list.value == [b"hello"] and features["none"].WhichOneof("kind") is None
    for document, message in (
            ({"context": [{"names": ["foo"]}], "examples": [{}]}, "Example must be JSON object"),
            ({"examples": {"names": ["foo", "bar"]}}, "list/array"),
            ({"examples": [[{"names": ["foo", "bar"]}]]}, "Example must be JSON object"),
            ({"examples": [{"names": [10, None]}]}, "names has element with unexpected JSON type: Null"),
            ({"examples": [{"names": [10, 10.0]}]}, "feature: names expecting type: int64"),
            ({"examples": [{"names": [10, {"test": 10}]}]}, "names has element with unexpected JSON type: Object"),
            ({"examples": [{"names": [[10], 20]}]}, "names has element with unexpected JSON type: Array"),
            ({"examples": [{"names": [20, 18446744073709551603]}]}, "Only int64_t is supported"),
            ({"examples": []}, "'examples' value is an empty array")):
        with pytest.raises(JsonTensorError, match=message):
            fill_examples_request(document, classification_pb2.ClassificationRequest())


def test_nesting_beyond_what_can_be_read_is_refused_not_crashed() -> None:
    """Lists nested past numpy's 64 dimensions, or past Python's parser's depth, are clear
    refusals (INVALID_ARGUMENT), where they raised out of the reader before. The instances'
    own list is the first dimension of the row format."""
    def body(key: str, depth: int) -> bytes:
        return ('{"%s": ' % key + "[" * depth + "1" + "]" * depth + "}").encode()

    for key in ("inputs", "instances"):
        assert read_predict(read_document(body(key, 64)), {"x": FLOAT})[0]["x"].ndim == 64
        with pytest.raises(JsonTensorError, match="dimensions: at most"):
            read_predict(read_document(body(key, 65)), {"x": FLOAT})
    with pytest.raises(JsonTensorError, match="nests too deeply"):
        read_document(body("inputs", 5000))
