"""TF Serving's REST API on the same models as the gRPC server.

    GET  /v1/models/NAME[/versions/N | /labels/L]             model status
    GET  /v1/models/NAME[/versions/N | /labels/L]/metadata    signature defs
    POST /v1/models/NAME[/versions/N | /labels/L]:predict     {"instances": [...]} or {"inputs": ...}

Same handlers as gRPC (``serving.server.predict`` and friends); NOT_FOUND is 404,
INVALID_ARGUMENT is 400, with ``{"error": "..."}`` as TF Serving answers.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

from serving.server import ModelManager, RequestError, model_metadata, model_status, predict
from serving.tensors import from_tensor_proto, to_tensor_proto

ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
                   r"(?P<action>/metadata|:predict)?$")
HTTP_STATUS = {grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.INVALID_ARGUMENT: 400}


def fill_spec(spec: Any, match: re.Match) -> None:
    spec.name = match["name"]
    if match["version"]:
        spec.version.value = int(match["version"])
    elif match["label"]:
        spec.version_label = match["label"]


def predict_request(body: dict[str, Any], match: re.Match) -> tuple[predict_pb2.PredictRequest, bool]:
    """A PredictRequest from TF Serving's row ("instances") or columnar ("inputs") JSON."""
    request = predict_pb2.PredictRequest()
    fill_spec(request.model_spec, match)
    request.model_spec.signature_name = body.get("signature_name", "")
    if ("instances" in body) == ("inputs" in body):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, 'the body needs exactly one of "instances" or "inputs"')
    rows = "instances" in body
    data = body["instances"] if rows else body["inputs"]
    if rows and data and isinstance(data[0], dict):
        data = {key: [instance[key] for instance in data] for key in data[0]}
    named = data if isinstance(data, dict) else {"image": data}
    for key, value in named.items():
        try:
            request.inputs[key].CopyFrom(to_tensor_proto(np.asarray(value, dtype=np.float32)))
        except (ValueError, TypeError) as error:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"input {key!r} is not a float tensor: {error}")
    return request, rows


def predict_json(response: predict_pb2.PredictResponse, rows: bool) -> dict[str, Any]:
    outputs = {key: from_tensor_proto(proto).tolist() for key, proto in response.outputs.items()}
    single = next(iter(outputs.values())) if len(outputs) == 1 else outputs
    return {"predictions": single} if rows else {"outputs": single}


def handle(manager: ModelManager, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    match = ROUTE.match(path)
    if not match or (method == "POST") != (match["action"] == ":predict"):
        return 404, {"error": f"no such endpoint: {method} {path}"}
    try:
        if match["action"] == ":predict":
            try:
                parsed = json.loads(body or b"{}")
            except json.JSONDecodeError as error:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"body is not JSON: {error}") from None
            request, rows = predict_request(parsed, match)
            return 200, predict_json(predict(manager, request), rows)
        if match["action"] == "/metadata":
            request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            fill_spec(request.model_spec, match)
            return 200, json_format.MessageToDict(model_metadata(manager, request), preserving_proto_field_name=True)
        request = get_model_status_pb2.GetModelStatusRequest()
        fill_spec(request.model_spec, match)
        return 200, json_format.MessageToDict(model_status(manager, request), preserving_proto_field_name=True)
    except RequestError as error:
        return HTTP_STATUS.get(error.code, 500), {"error": str(error)}


class RestServer:
    """A threaded HTTP server beside the gRPC one, on ``--rest-api-port``."""

    def __init__(self, manager: ModelManager, host: str, port: int, max_body_bytes: int):
        class Handler(BaseHTTPRequestHandler):
            def reply(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
                self.reply(*handle(manager, "GET", self.path, b""))

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                if length > max_body_bytes:
                    self.reply(413, {"error": f"body of {length} bytes exceeds {max_body_bytes}"})
                    return
                self.reply(*handle(manager, "POST", self.path, self.rfile.read(length)))

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  quiet access log
                return

        self.http = ThreadingHTTPServer((host, port), Handler)
        self.port = self.http.server_address[1]
        self.thread = threading.Thread(target=self.http.serve_forever, name="rest-api", daemon=True)

    def start(self) -> "RestServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()
