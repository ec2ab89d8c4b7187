"""The request handlers shared by the gRPC and REST front ends, with TF Serving's checks,
status codes and messages (``servables/tensorflow/predict_util.cc``, ``classifier.cc``,
``regressor.cc``, ``get_model_metadata_impl.cc``, ``model_servers/get_model_status_impl.cc``).
Each raises RequestError with the code TF Serving answers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    predict_pb2,
    regression_pb2,
)

from serving.model_server.errors import RequestError
from serving.model_server.manager import DEFAULT_SIGNATURE, LoadedVersion, ModelManager
from serving.model_server.tensors import TensorError, from_tensor_proto, to_tensor_proto

PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
INFERENCE_METHODS = (PREDICT_METHOD, CLASSIFY_METHOD, REGRESS_METHOD)  # predict_util.cc VerifySignature
EXAMPLE_INPUTS = "inputs"  # kClassifyInputs, kRegressInputs: the serialized tf.Examples


@dataclass(frozen=True)
class PredictOptions:
    tensor_content: bool = False  # --enable_serialization_as_tensor_content
    reject_non_finite: bool = False  # opt-in: TF Serving runs NaN and infinity through
    method_name_check: bool = False  # --enable_signature_method_name_check
    max_images: int = 4096  # --max-images-per-request: the first dimension of any input, checked before decoding


def check_request_size(request, max_images: int) -> None:
    """Refuse a request whose inputs declare more than ``max_images`` rows, from their shapes
    alone (a request's memory goes into decoding it, so the check comes first)."""
    for name, tensor in request.inputs.items():
        rows = tensor.tensor_shape.dim[0].size if tensor.tensor_shape.dim else 1
        if math.prod(dim.size for dim in tensor.tensor_shape.dim if dim.size) >= 2**63:
            continue  # a shape no tensor can have (TensorShape overflows): the parser refuses it in TF's words
        if max_images and rows > max_images:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"input '{name}' has {rows} rows, more than the {max_images} images one request may "
                               "carry (--max-images-per-request); split it")


def require_model_spec(request) -> None:
    if not request.HasField("model_spec"):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def braces(names) -> str:
    return "{" + ",".join(sorted(names)) + "}"


def run_signature(loaded: LoadedVersion, signature_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Call the signature; what TensorFlow refuses about the inputs is INVALID_ARGUMENT, as from a Session."""
    try:
        return loaded.run(signature_name, inputs)
    except (tf.errors.InvalidArgumentError, ValueError, TypeError) as error:
        raise invalid(str(error).strip().splitlines()[0]) from None


# --- Predict ----------------------------------------------------------------------
def check_input_count(signature: meta_graph_pb2.SignatureDef, request: predict_pb2.PredictRequest) -> None:
    given, expected = set(request.inputs), set(signature.inputs)
    if len(given) > len(expected) or (len(given) < len(expected) and not signature.defaults):
        raise invalid(f"input size does not match signature: {len(given)}!={len(expected)} "
                      f"len({braces(given)}) != len({braces(expected)}). Sent extra: {braces(given - expected)}. "
                      f"Missing but required: {braces(expected - given)}.")


def shape_fits(required: list[int], shape: tuple[int, ...]) -> bool:
    return len(required) == len(shape) and all(r in (-1, s) for r, s in zip(required, shape))


def read_inputs(signature: meta_graph_pb2.SignatureDef, request: predict_pb2.PredictRequest,
                options: PredictOptions, check_shapes: bool = True) -> dict[str, np.ndarray]:
    """The request's inputs as arrays. TF Serving checks names, sizes and dtypes (predict_util.cc)
    and leaves shapes to the graph; ``check_shapes`` also holds them to the signature, for the
    functions that cannot be left to find out (``LoadedVersion.runs_as_a_session``)."""
    check_input_count(signature, request)
    arrays = {}
    for name, proto in request.inputs.items():
        if name not in signature.inputs:
            raise invalid(f"input tensor alias not found in signature: {name}. "
                          f"Inputs expected to be in the set {braces(signature.inputs)}.")
        try:
            array = from_tensor_proto(proto)
        except TensorError as error:
            raise invalid(f"tensor parsing error: {name} ({types_pb2.DataType.Name(proto.dtype)}): {error}") from None
        info = signature.inputs[name]
        if proto.dtype != info.dtype:
            raise invalid(f"Expects arg '{name}' to be {types_pb2.DataType.Name(info.dtype)} but "
                          f"{types_pb2.DataType.Name(proto.dtype)} is provided")
        required = [dim.size for dim in info.tensor_shape.dim]
        if check_shapes and not info.tensor_shape.unknown_rank and not shape_fits(required, array.shape):
            raise invalid(f"input '{name}' has shape {list(array.shape)}, incompatible with the signature's "
                          f"{required}")
        if options.reject_non_finite and array.dtype.kind == "f" and not np.isfinite(array).all():
            raise invalid(f"input '{name}' contains NaN or infinity")
        arrays[name] = array
    return arrays


def output_aliases(signature: meta_graph_pb2.SignatureDef, output_filter) -> list[str]:
    seen: list[str] = []
    for alias in output_filter:
        if alias not in signature.outputs:
            raise invalid(f"output tensor alias not found in signature: {alias} Outputs expected to be in the set "
                          f"{braces(signature.outputs)}.")
        if alias in seen:
            raise invalid(f"duplicate output tensor alias: {alias}")
        seen.append(alias)
    return seen or list(signature.outputs)


def predict(manager: ModelManager, request: predict_pb2.PredictRequest,
            options: PredictOptions = PredictOptions()) -> predict_pb2.PredictResponse:
    with manager.answering():
        return answer_predict(manager, request, options)


def answer_predict(manager: ModelManager, request: predict_pb2.PredictRequest,
                   options: PredictOptions) -> predict_pb2.PredictResponse:
    require_model_spec(request)
    name, loaded = manager.resolve(request.model_spec)
    signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
    signature = loaded.signature_defs.get(signature_name)
    if signature is None:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{signature_name}" not found.')
    if options.method_name_check and signature.method_name not in INFERENCE_METHODS:
        methods = ", ".join(INFERENCE_METHODS)
        raise RequestError(grpc.StatusCode.INTERNAL, "Expected prediction signature method_name to be one of "
                                                     f"{{{methods}}}. Was: {signature.method_name}")
    check_request_size(request, options.max_images)
    inputs = read_inputs(signature, request, options, check_shapes=not loaded.runs_as_a_session(signature_name))
    aliases = output_aliases(signature, request.output_filter)
    outputs = run_signature(loaded, signature_name, inputs)
    response = predict_pb2.PredictResponse()
    response.model_spec.name, response.model_spec.signature_name = name, signature_name
    response.model_spec.version.value = loaded.version
    for alias in aliases:
        response.outputs[alias].CopyFrom(to_tensor_proto(outputs[alias], as_content=options.tensor_content))
    return response


# --- Classify and Regress -----------------------------------------------------------
def serialized_examples(request) -> np.ndarray:
    """The request's tf.Examples, serialized; with a context, context bytes first (merged on parse)."""
    kind = request.input.WhichOneof("kind")
    if kind == "example_list":
        examples, context = request.input.example_list.examples, b""
    elif kind == "example_list_with_context":
        examples = request.input.example_list_with_context.examples
        context = request.input.example_list_with_context.context.SerializeToString()
    else:
        examples, context = [], b""
    if not examples:
        raise invalid("Input is empty.")
    return np.array([context + example.SerializeToString() for example in examples], dtype=object)


def example_signature(manager: ModelManager, request, method: str, kind: str, method_name_check: bool
                      ) -> tuple[str, LoadedVersion, str, meta_graph_pb2.SignatureDef]:
    """The signature a Classify or Regress names, checked as TF Serving checks it
    (classifier.cc / regressor.cc ``GetClassificationSignatureDef``, ``PreProcess*``): its
    method_name only with --enable_signature_method_name_check (TF2 SavedModels name every
    signature tensorflow/serving/predict), else its shape: one input, named ``inputs``."""
    require_model_spec(request)
    name, loaded = manager.resolve(request.model_spec)
    signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
    signature = loaded.signature_defs.get(signature_name)
    if signature is None:
        raise invalid(f"No signature was found with the name: {signature_name}")
    if method_name_check and signature.method_name != method:
        raise invalid(f"Expected {kind} signature method_name to be {method}. Was: {signature.method_name}")
    if len(signature.inputs) != 1:
        raise invalid("Expected one input Tensor.")
    if EXAMPLE_INPUTS not in signature.inputs:
        raise invalid(f"No {kind} inputs found in SignatureDef: {signature}")
    return name, loaded, signature_name, signature


def fill_model_spec(spec, name: str, signature_name: str, version: int) -> None:
    spec.name, spec.signature_name = name, signature_name
    spec.version.value = version


def classify(manager: ModelManager, request: classification_pb2.ClassificationRequest,
             options: PredictOptions = PredictOptions()) -> classification_pb2.ClassificationResponse:
    name, loaded, signature_name, signature = example_signature(manager, request, CLASSIFY_METHOD, "classification",
                                                                options.method_name_check)
    if not {"classes", "scores"} & set(signature.outputs):
        raise invalid('Expected classification signature outputs to contain at least one of "classes" or "scores".')
    examples = serialized_examples(request)
    outputs = run_signature(loaded, signature_name, {next(iter(signature.inputs)): examples})
    classes, scores = outputs.get("classes"), outputs.get("scores")
    for tensor in (classes, scores):
        if tensor is not None and (tensor.ndim != 2 or tensor.shape[0] != len(examples)):
            raise invalid(f"Expected Tensor shape: [batch_size num_classes] but got {list(tensor.shape)}")
    response = classification_pb2.ClassificationResponse()
    fill_model_spec(response.model_spec, name, signature_name, loaded.version)
    present = classes if classes is not None else scores
    if present is None:  # the signature names one; its function must return it
        raise invalid('Expected classification signature outputs to contain at least one of "classes" or "scores".')
    width = present.shape[1]
    for row in range(len(examples)):
        classifications = response.result.classifications.add()
        for column in range(width):
            entry = classifications.classes.add()
            if classes is not None:
                entry.label = classes[row, column].decode() if isinstance(classes[row, column], bytes) \
                    else str(classes[row, column])
            if scores is not None:
                entry.score = float(scores[row, column])
    return response


def regress(manager: ModelManager, request: regression_pb2.RegressionRequest,
            options: PredictOptions = PredictOptions()) -> regression_pb2.RegressionResponse:
    name, loaded, signature_name, signature = example_signature(manager, request, REGRESS_METHOD, "regression",
                                                                options.method_name_check)
    if len(signature.outputs) != 1:
        raise invalid("Expected one output Tensor.")
    if "outputs" not in signature.outputs:
        raise invalid(f"No regression outputs found in SignatureDef: {signature}")
    examples = serialized_examples(request)
    outputs = run_signature(loaded, signature_name, {next(iter(signature.inputs)): examples})
    values = next(iter(outputs.values()))
    if not (values.ndim == 1 or (values.ndim == 2 and values.shape[1] == 1)):
        raise invalid(f"Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got "
                      f"{list(values.shape)}")
    response = regression_pb2.RegressionResponse()
    fill_model_spec(response.model_spec, name, signature_name, loaded.version)
    for value in values.reshape(-1):
        response.result.regressions.add().value = float(value)
    return response


def multi_inference(manager: ModelManager, request: inference_pb2.MultiInferenceRequest,
                    options: PredictOptions = PredictOptions()) -> inference_pb2.MultiInferenceResponse:
    """TF Serving's MultiInference (multi_inference.cc, multi_inference_helper.cc): Classify and
    Regress tasks on one input of examples, all on one model and the version the first task's
    model spec resolves to, each signature at most once, answered together."""
    model_name, signatures = "", set()
    for task in request.tasks:
        if not task.model_spec.name:
            raise invalid("Found ModelSpec with an empty model name.")
        if model_name and task.model_spec.name != model_name:
            raise invalid("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
        model_name = task.model_spec.name
        signature_name = task.model_spec.signature_name or DEFAULT_SIGNATURE
        if signature_name in signatures:
            raise invalid(f"Duplicate evaluation of signature: {signature_name}")
        signatures.add(signature_name)
    if not request.tasks:
        raise invalid("Found ModelSpec with an empty model name.")
    name, loaded = manager.resolve(request.tasks[0].model_spec)
    response = inference_pb2.MultiInferenceResponse()
    for task in request.tasks:
        signature_name = task.model_spec.signature_name or DEFAULT_SIGNATURE
        if signature_name not in loaded.signature_defs:
            raise invalid(f"Requested signature not found in model graph: {signature_name}")
        if task.method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
            raise RequestError(grpc.StatusCode.UNIMPLEMENTED, f"Unsupported signature method_name: {task.method_name}")
        single = (classification_pb2.ClassificationRequest() if task.method_name == CLASSIFY_METHOD
                  else regression_pb2.RegressionRequest())
        single.model_spec.name, single.model_spec.signature_name = name, task.model_spec.signature_name
        single.model_spec.version.value = loaded.version  # every task on the one version resolved
        single.input.CopyFrom(request.input)
        result = response.results.add()
        if task.method_name == CLASSIFY_METHOD:
            answer = classify(manager, single, options)
            result.classification_result.CopyFrom(answer.result)
        else:
            answer = regress(manager, single, options)
            result.regression_result.CopyFrom(answer.result)
        result.model_spec.CopyFrom(answer.model_spec)
    return response


# --- Metadata and status -------------------------------------------------------------
def model_metadata(manager: ModelManager, request: get_model_metadata_pb2.GetModelMetadataRequest
                   ) -> get_model_metadata_pb2.GetModelMetadataResponse:
    require_model_spec(request)
    if not request.metadata_field:
        raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
    for metadata_field in request.metadata_field:
        if metadata_field != "signature_def":
            raise invalid(f"Metadata field {metadata_field} is not supported")
    name, loaded = manager.resolve(request.model_spec)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature in loaded.signature_defs.items():
        signature_map.signature_def[key].CopyFrom(signature)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = name
    response.model_spec.version.value = loaded.version
    response.metadata["signature_def"].Pack(signature_map)
    return response


def model_status(manager: ModelManager, request: get_model_status_pb2.GetModelStatusRequest
                 ) -> get_model_status_pb2.GetModelStatusResponse:
    """Every version the server has known (END included), newest first; only ``version``
    narrows the list, a label does not (``GetModelStatusWithModelSpec``)."""
    require_model_spec(request)
    spec = request.model_spec
    states = manager.version_states(spec.name)
    if spec.HasField("version"):
        if spec.version.value not in states:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"Could not find version {spec.version.value} of model {spec.name}")
        states = {spec.version.value: states[spec.version.value]}
    elif not states:
        raise RequestError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {spec.name}")
    response = get_model_status_pb2.GetModelStatusResponse()
    for version in sorted(states, reverse=True):
        entry = response.model_version_status.add()
        entry.version, entry.state = version, states[version].state
        entry.status.error_code = states[version].error_code.value[0]
        entry.status.error_message = states[version].error_message
    return response
