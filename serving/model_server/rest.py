"""TF Serving's REST API on the same models as the gRPC server.

    GET  /v1/models/NAME[/versions/N | /labels/L]                     model status
    GET  /v1/models/NAME[/versions/N | /labels/L]/metadata            signature defs
    POST /v1/models/NAME[/versions/N | /labels/L]:predict             {"instances": [...]} or {"inputs": ...}
    POST /v1/models/NAME[/versions/N | /labels/L]:classify|:regress   {"examples": [...], "context": {...}}

Routing, request parsing and bodies follow ``model_servers/http_rest_api_handler.cc``,
``http_rest_api_util.cc`` and ``util/json_tensor.cc`` (``serving/json_*.py``); status codes follow
``http_server.cc``'s ``ToHTTPStatusCode``. Errors are ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Callable, TypeVar

import grpc
from google.protobuf import json_format
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    predict_pb2,
    regression_pb2,
)

from serving.model_server.errors import RequestError
from serving.model_server.inference import (
    PredictOptions,
    classify,
    invalid,
    model_metadata,
    model_status,
    predict,
    regress,
)
from serving.model_server.json_answers import classify_body, predict_body, regress_body
from serving.model_server.json_examples import fill_examples_request
from serving.model_server.manager import DEFAULT_SIGNATURE, ModelManager
from serving.model_server.tensors import from_tensor_proto, to_tensor_proto
from serving.protocol.http import JSON, HttpLimits, HttpServer, Reply, Request, json_reply
from serving.protocol.json_document import JsonTensorError, read_document
from serving.protocol.json_tensor import dtypes, read_predict
from serving.protocol.monitoring import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serving.protocol.monitoring import ServingMetrics, readiness
from serving.protocol.rest_paths import (
    PREDICTION_ROUTE,
    READY_ROUTE,
    STATUS_ROUTE,
    ModelPath,
    PathError,
    fill_spec,
    model_path,
)
from storage.errors import http_status

T = TypeVar("T")

def path_of(match: re.Match) -> ModelPath:
    try:
        return model_path(match)
    except PathError as error:
        raise invalid(str(error)) from None


def tf_serving_json(call: Callable[[], T]) -> T:
    """Run a step of the JSON readers or writers, its refusal as the RequestError (and so HTTP status)
    TF Serving gives."""
    try:
        return call()
    except JsonTensorError as error:
        raise RequestError(grpc.StatusCode[error.code], str(error)) from None


def signature_inputs(manager: ModelManager, request: predict_pb2.PredictRequest) -> dict[str, int]:
    """Input name -> dtype of the signature asked for (``GetInfoMap``)."""
    _, loaded = manager.resolve(request.model_spec)
    signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
    if signature_name not in loaded.signature_defs:
        raise invalid(f'Serving signature name: "{signature_name}" not found in signature def')
    return dtypes(loaded.signature_defs[signature_name].inputs)


def predict_request(document: dict[str, Any], model: ModelPath, manager: ModelManager
                    ) -> tuple[predict_pb2.PredictRequest, bool]:
    """A PredictRequest from TF Serving's row ("instances") or columnar ("inputs") JSON, read as
    json_tensor.cc reads it once the signature is known."""
    request = predict_pb2.PredictRequest()
    fill_spec(request.model_spec, model)
    request.model_spec.signature_name = document.get("signature_name", "")
    inputs = signature_inputs(manager, request)
    tensors, rows = tf_serving_json(lambda: read_predict(document, inputs, request.model_spec.signature_name))
    for name, array in tensors.items():
        request.inputs[name].CopyFrom(to_tensor_proto(array))
    return request, rows


def predict_json(response: predict_pb2.PredictResponse, rows: bool) -> str:
    outputs = {key: from_tensor_proto(proto) for key, proto in response.outputs.items()}
    return tf_serving_json(lambda: predict_body(outputs, rows))


def example_request(document: dict[str, Any], model: ModelPath, request: Any) -> Any:
    """A Classification- or RegressionRequest from ``{"examples": [...], "context": {...}}``."""
    fill_spec(request.model_spec, model)
    request.model_spec.signature_name = document.get("signature_name", "")
    tf_serving_json(lambda: fill_examples_request(document, request))
    return request


def classify_json(response: classification_pb2.ClassificationResponse) -> str:
    return tf_serving_json(lambda: classify_body([[(entry.label, entry.score) for entry in classifications.classes]
                                                  for classifications in response.result.classifications]))


def regress_json(response: regression_pb2.RegressionResponse) -> str:
    return tf_serving_json(lambda: regress_body([regression.value for regression in response.result.regressions]))


def to_dict(message: Any, preserve_names: bool) -> dict[str, Any]:
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True,
                                     preserving_proto_field_name=preserve_names)


def metadata_json(response: get_model_metadata_pb2.GetModelMetadataResponse) -> dict[str, Any]:
    """``ToJsonString``: model_spec and the unpacked SignatureDefMap, proto field names, defaults printed."""
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    return {"model_spec": to_dict(response.model_spec, True),
            "metadata": {"signature_def": to_dict(signatures, True)}}


def dispatch(manager: ModelManager, method: str, path: str, body: bytes, options: PredictOptions
             ) -> tuple[str, int | None]:
    """The JSON answer, and for a prediction call the version that answered."""
    if method == "POST" and (match := PREDICTION_ROUTE.match(path)):
        model = path_of(match)
        document = tf_serving_json(lambda: read_document(body))
        action = match["method"].lower()
        if action == "predict":
            request, rows = predict_request(document, model, manager)
            response = predict(manager, request, options)
            return predict_json(response, rows), response.model_spec.version.value
        if action == "classify":
            request = example_request(document, model, classification_pb2.ClassificationRequest())
            response = classify(manager, request, options)
            return classify_json(response), response.model_spec.version.value
        response = regress(manager, example_request(document, model, regression_pb2.RegressionRequest()), options)
        return regress_json(response), response.model_spec.version.value
    if method == "GET" and (match := STATUS_ROUTE.match(path)):
        model = path_of(match)
        if not model.name:
            raise invalid("Missing model name in request.")
        if match["metadata"]:
            request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            fill_spec(request.model_spec, model)
            return json.dumps(metadata_json(model_metadata(manager, request))), None
        request = get_model_status_pb2.GetModelStatusRequest()
        fill_spec(request.model_spec, model)
        return json.dumps(to_dict(model_status(manager, request), False)), None
    raise invalid(f"Malformed request: {method} {path}")


def handle(manager: ModelManager, method: str, path: str, body: bytes,
           options: PredictOptions = PredictOptions(), metrics: ServingMetrics | None = None
           ) -> tuple[int, str]:
    """(HTTP status, JSON answer); prediction calls are counted in ``metrics`` as TF Serving counts them."""
    start = time.perf_counter()
    version, code = None, grpc.StatusCode.OK
    try:
        answer, version = dispatch(manager, method, path, body, options)
        status = 200
    except RequestError as error:
        code, status, answer = error.code, error.http_status, json.dumps({"error": str(error)})
    match = PREDICTION_ROUTE.match(path) if method == "POST" else None
    if metrics and match:
        try:
            model = model_path(match)
        except PathError:
            model = ModelPath(match["name"])
        metrics.observe(model.name, version, model.label or "", match["method"].lower(), "REST", code.name,
                        time.perf_counter() - start)
    return status, answer


API_PATH = re.compile(r"(?i)/v1/.*")  # http_rest_api_handler.cc kPathRegex
# http_rest_api_util.cc AddCORSHeaders, on every REST API reply with --rest_api_enable_cors_support
CORS_HEADERS = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "POST, GET",
                "Access-Control-Allow-Headers": "Content-Type"}


def preflight(request: Request) -> Reply:
    """A CORS preflight, as http_server.cc answers one whatever the CORS flag: OK when the Origin
    header holds an http(s) origin, FAILED_PRECONDITION otherwise; no body either way."""
    if re.search(r"https?://", request.headers.get("origin", "")):
        return Reply(200, b"")
    return Reply(http_status("FAILED_PRECONDITION"), b"")


def ready(manager: ModelManager, match: re.Match) -> tuple[int, dict[str, Any]]:
    """Ready when a request for this model (version, label) would be served now."""
    spec = model_pb2.ModelSpec()
    try:
        fill_spec(spec, path_of(match))
        return readiness(manager.resolve(spec)[1].version)
    except RequestError as error:
        return readiness(None, str(error))


class RestServer:
    """TF Serving's REST API beside the gRPC server, on ``--rest-api-port``; with metrics on,
    Prometheus's page at the monitoring config's path; and the readiness route."""

    def __init__(self, manager: ModelManager, host: str, port: int, max_body_bytes: int,
                 options: PredictOptions = PredictOptions(), metrics: ServingMetrics | None = None,
                 metrics_path: str | None = None, cors: bool = False, limits: HttpLimits = HttpLimits()):
        def respond(request: Request) -> Reply:
            if metrics and request.method == "GET" and request.path == metrics_path:
                return Reply(200, metrics.page(), METRICS_CONTENT_TYPE)
            if request.method == "GET" and (match := READY_ROUTE.match(request.path)):
                return json_reply(*ready(manager, match))
            if not API_PATH.fullmatch(request.path):  # no dispatcher of http_server.cc takes it: libevent's 404
                reply = json_reply(404, {"error": f"Not Found: {request.path} (the REST API's paths begin /v1/)"})
            elif request.method == "OPTIONS":
                reply = preflight(request)
            else:
                status, answer = handle(manager, request.method, request.path, request.body, options, metrics)
                reply = Reply(status, answer.encode(), JSON)
            if not cors:
                return reply
            return Reply(reply.status, reply.body, reply.content_type, {**reply.headers, **CORS_HEADERS})

        self.http = HttpServer(host, port, max_body_bytes, respond, name="rest-api", limits=limits)
        self.port = self.http.port

    def start(self) -> "RestServer":
        self.http.start()
        return self

    def stop(self) -> None:
        self.http.stop()
