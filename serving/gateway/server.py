"""The logging gateway: a sidecar in front of TF Serving (or ``mnist serve``), the KServe and
Seldon pattern, because TF Serving's own request logging is unusable in the open-source binary
(tensorflow/serving#408, #2223, #2677).

- gRPC: the caller's connection is relayed to upstream frame by frame (``serving/gateway/relay.py``):
  every service upstream has passes through, messages byte for byte, the caller's deadline and
  metadata go upstream and upstream's status comes back. Every Predict gets a request id of the
  gateway's own, sent upstream and returned in the trailing metadata; a caller's ``x-request-id``
  is kept beside it in the log as ``client_request_id``, never as the key feedback addresses.
- REST: TF Serving's REST API passes through to ``upstream_rest``; ``:predict`` answers carry
  the id in an ``X-Request-Id`` header.
- A sampled fraction of the model's Predict calls goes to ``PredictionLogger`` (bounded queue,
  background writer, TF Serving ``PredictionLog`` records in the store): logging never blocks
  or fails a request.
- ``POST /v1/models/NAME/feedback`` records a caller's label for a logged request: it takes a
  bearer token from ``--feedback-tokens`` (``serving/gateway/callers.py``), at a rate per caller;
  ``/monitoring/prometheus/metrics`` and ``/v1/models/NAME[...]/ready`` as in
  ``serving/protocol/monitoring.py``.

It imports no TensorFlow: its messages are the generated ones of ``mnist_client``.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from mnist_client.client import REQUEST_ID
from mnist_client.protos import get_model_metadata_pb2, model_pb2, predict_pb2
from mnist_client.tensors import to_tensor_proto
from serving.gateway.callers import Authenticator, Credential, RateLimit
from serving.gateway.log_records import Call, Unloggable, request_outline
from serving.gateway.prediction_logger import Ledger, PredictionLogger
from serving.gateway.relay import GrpcRelay
from serving.gateway.spool import Spool
from serving.gateway.watched_calls import Exchange, Watch, grpc_message
from serving.protocol.http import JSON, HttpLimits, HttpServer, Reply, Request, json_reply
from serving.protocol.json_document import JsonTensorError, parse_document, read_document
from serving.protocol.json_tensor import dtypes, read_columns, read_predict, read_rows
from serving.protocol.monitoring import CONTENT_TYPE, PROMETHEUS_PATH, ServingMetrics, readiness
from serving.protocol.rest_paths import (
    FEEDBACK_ROUTE,
    PREDICTION_ROUTE,
    READY_ROUTE,
    ModelPath,
    PathError,
    fill_spec,
    model_path,
)
from storage.errors import STATUS_OF_HTTP
from storage.feedback import FeedbackError, Located, record_feedback
from storage.live_check import LiveCheckKey
from storage.logs import FeedbackStore, PredictionLogStore, new_request_id, valid_request_id
from storage.s3 import StoreError

log = logging.getLogger("mnist.gateway")
PREDICT = "/tensorflow.serving.PredictionService/Predict"
METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
# not forwarded: the connection's own headers, and metadata gRPC sets itself
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "te", "upgrade",
               "proxy-connection", REQUEST_ID}
REPLY_SETS = HOP_HEADERS | {"content-type", "date", "server"}  # what the gateway's own reply sets
MAX_FEEDBACK_BODY = 4096  # {"request_id", "label", "index"}: far less; more is not feedback
SIGNATURE_TTL = 1.0  # seconds a resolved (version, signatures) is reused for REST metrics and logs


@dataclass
class GatewayOptions:
    upstream: str  # HOST:PORT of TF Serving's gRPC API
    upstream_rest: str | None = None  # HOST:PORT of its REST API (None: REST calls other than ours get 501)
    port: int = 0
    rest_port: int = 0  # 0: no REST front
    host: str = "127.0.0.1"
    model_name: str = "mnist"  # whose Predict calls are logged and take feedback
    sample_rate: float = 1.0
    queue_size: int = 10_000
    queue_bytes: int = 256 << 20
    batch_records: int = 256
    flush_seconds: float = 5.0
    max_message_bytes: int = 64 << 20
    rest_max_body_bytes: int = 16 << 20  # REST bodies, as sent and inflated: the gateway parses them to log them
    rest_limits: HttpLimits = field(default_factory=HttpLimits)  # REST timeouts, connections and threads
    credentials: tuple[Credential, ...] = ()  # who may send feedback; none: feedback is refused
    tokens_file: Path | None = None  # where they were read: read again when it changes
    ledger: Path | None = None  # where the count of unwritten logs is kept, for the next start to report
    spool: Path | None = None  # where batches the store does not take wait on disk (None: they are dropped)
    spool_bytes: int = 1 << 30
    feedback_per_minute: float = 60.0  # per caller
    # what tells a publish's live check (which takes no feedback) from traffic; None: nothing does
    live_check_key: LiveCheckKey | None = None


class Gateway:
    def __init__(self, options: GatewayOptions, logs: PredictionLogStore, feedback: FeedbackStore):
        self.options, self.logs, self.feedback = options, logs, feedback
        self.metrics = ServingMetrics()
        self.logger = PredictionLogger(logs, options.sample_rate, self.metrics.registry, self.to_messages,
                                       options.queue_size, options.batch_records, options.flush_seconds,
                                       queue_bytes=options.queue_bytes,
                                       ledger=Ledger(options.ledger) if options.ledger else None,
                                       spool=Spool(options.spool, logs.uri(), options.spool_bytes)
                                       if options.spool else None)
        limits = [("grpc.max_receive_message_length", options.max_message_bytes),
                  ("grpc.max_send_message_length", options.max_message_bytes)]
        self.channel = grpc.insecure_channel(options.upstream, options=limits)  # the REST side's metadata calls
        self.metadata_call = self.channel.unary_unary(METADATA)
        self.relay = GrpcRelay(options.host, options.port, options.upstream,
                               Watch(PREDICT.encode(), REQUEST_ID.encode(), self.request_id, self.finished,
                                     options.max_message_bytes))
        self.rest = (HttpServer(options.host, options.rest_port, options.rest_max_body_bytes, self.respond,
                                name="gateway-rest", limits=options.rest_limits) if options.rest_port else None)
        self.local = threading.local()  # one keep-alive connection to upstream REST per thread
        self.rest_connections: set[http.client.HTTPConnection] = set()  # the threads' kept ones, to close at stop
        self.rest_connections_lock = threading.Lock()
        self.signatures: dict[ModelPath, tuple[float, int, Any]] = {}  # model path -> (when, version, signatures)
        self.authenticator = Authenticator(list(options.credentials), options.tokens_file)
        self.feedback_rate = RateLimit(options.feedback_per_minute)

    def start(self) -> "Gateway":
        self.logger.start()
        self.relay.start()
        if self.rest:
            self.rest.start()
        return self

    @property
    def port(self) -> int:
        """The gRPC port, once started (the relay's)."""
        return self.relay.port

    def stop(self, drain_seconds: float = 10.0) -> None:
        """Stop taking calls, let those in flight finish, then flush the log queue within the deadline."""
        if self.rest:
            self.rest.stop()
        with self.rest_connections_lock:
            for connection in self.rest_connections:
                connection.close()
        self.relay.stop(grace=2.0)
        self.logger.close(drain_seconds)
        self.channel.close()

    # --- gRPC ---------------------------------------------------------------------------
    @staticmethod
    def request_id(_given: str | None) -> str:
        """Always the gateway's own: a caller's id could name another caller's call."""
        return new_request_id()

    def finished(self, call: Exchange, status: int, _message: str) -> None:
        """A relayed Predict ended: counted per version, and offered to the log when it succeeded."""
        request_bytes = grpc_message(call.request, call.request_encoding)
        try:
            request = predict_pb2.PredictRequest.FromString(request_bytes or b"")
        except DecodeError:
            request = predict_pb2.PredictRequest()  # upstream said what is wrong with it
        spec, version = request.model_spec, None
        answer = grpc_message(call.response, call.response_encoding) if status == 0 else None
        if answer is not None:
            try:
                version = predict_pb2.PredictResponse.FromString(answer).model_spec.version.value
            except DecodeError:
                answer = None
        self.metrics.observe(spec.name, version, spec.version_label, "Predict", "GRPC",
                             STATUS_NAMES.get(status, "UNKNOWN"), time.perf_counter() - call.started)
        if request_bytes is not None and answer is not None:
            self.maybe_log(spec.name, Call(call.request_id, "grpc", request_outline(request), request_bytes, answer,
                                           version, client_request_id=client_id(call.client_request_id)))

    def maybe_log(self, model_name: str, call: Call) -> None:
        if model_name != self.options.model_name:
            return  # logs are kept per model name, and only for the model named: never a key from a request
        if self.logger.sampled():
            self.logger.offer(call)
        else:
            self.logger.skipped(call.request_id)

    # --- REST ---------------------------------------------------------------------------
    def respond(self, request: Request) -> Reply:
        if request.method == "GET" and request.path == PROMETHEUS_PATH:
            return Reply(200, self.metrics.page(), CONTENT_TYPE)
        try:
            if request.method == "GET" and (match := READY_ROUTE.match(request.path)):
                return json_reply(*self.ready(model_path(match)))
            if request.method == "POST" and (match := FEEDBACK_ROUTE.match(request.path)):
                return self.take_feedback(model_path(match).name, request)
            if (request.method == "POST" and (match := PREDICTION_ROUTE.match(request.path))
                    and match["method"].lower() == "predict"):
                return self.rest_predict(model_path(match), request)
        except PathError as error:
            return json_reply(400, {"error": str(error)})
        return self.forward_rest(request)

    def rest_connection(self, fresh: bool) -> http.client.HTTPConnection:
        """This thread's kept connection upstream; ``fresh``: a new one in place of the old, which is
        let go (kept, every reconnect would grow the set the stop closes)."""
        connection = getattr(self.local, "connection", None)
        if connection is None or fresh:
            host, _, port = str(self.options.upstream_rest).rpartition(":")
            replacement = self.local.connection = http.client.HTTPConnection(host, int(port), timeout=60)
            with self.rest_connections_lock:
                if connection is not None:
                    connection.close()
                    self.rest_connections.discard(connection)
                self.rest_connections.add(replacement)
            connection = replacement
        return connection

    def forward_rest(self, request: Request, extra: dict[str, str] | None = None) -> Reply:
        if not self.options.upstream_rest:
            return json_reply(501, {"error": "this gateway has no upstream REST API (mnist gateway --upstream-rest)"})
        headers = {k: v for k, v in request.headers.items() if k not in HOP_HEADERS} | (extra or {})
        path = request.path + (f"?{request.query}" if request.query else "")
        problem: Exception | None = None
        for attempt in range(2):  # a keep-alive connection upstream closed meanwhile: once more, on a new one
            connection = self.rest_connection(fresh=attempt > 0)
            try:
                connection.request(request.method, path, body=request.body or None, headers=headers)
                answer = connection.getresponse()
                # the server's own headers (CORS with --rest_api_enable_cors_support) reach the caller
                passed = {name: value for name, value in answer.getheaders() if name.lower() not in REPLY_SETS}
                return Reply(answer.status, answer.read(), answer.getheader("Content-Type", JSON), passed)
            except (http.client.HTTPException, OSError) as error:
                problem = error
        return json_reply(503, {"error": f"upstream REST API at {self.options.upstream_rest} is unavailable: "
                                         f"{problem}"})

    def rest_predict(self, model: ModelPath, request: Request) -> Reply:
        start = time.perf_counter()
        request_id = new_request_id()
        reply = self.forward_rest(request, {"X-Request-Id": request_id})
        version = self.resolved_version(model) if reply.status == 200 else None
        self.metrics.observe(model.name, version, model.label or "", "predict", "REST",
                             STATUS_OF_HTTP.get(reply.status, "UNKNOWN"), time.perf_counter() - start)
        if reply.status == 200:
            self.maybe_log(model.name, Call(request_id, "rest", rest={"model": model, "request": request.body,
                                                                       "response": reply.body},
                                            client_request_id=client_id(request.headers.get(REQUEST_ID))))
        return Reply(reply.status, reply.body, reply.content_type, {**reply.headers, "X-Request-Id": request_id})

    # --- what the upstream serves ----------------------------------------------------------
    def metadata(self, model: ModelPath, timeout: float = 5.0) -> get_model_metadata_pb2.GetModelMetadataResponse:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        fill_spec(request.model_spec, model)
        answer = self.metadata_call(request.SerializeToString(), timeout=timeout)
        return get_model_metadata_pb2.GetModelMetadataResponse.FromString(answer)

    def signature_map(self, model: ModelPath) -> tuple[int, Any]:
        """(version, SignatureDefMap) a REST call to this model path was answered by, reused for a second."""
        cached = self.signatures.get(model)
        if cached and time.monotonic() - cached[0] < SIGNATURE_TTL:
            return cached[1], cached[2]
        response = self.metadata(model)
        if len(self.signatures) > 1000:  # specs come from request paths: keep the cache bounded
            self.signatures.clear()
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        self.signatures[model] = (time.monotonic(), response.model_spec.version.value, signatures)
        return response.model_spec.version.value, signatures

    def resolved_version(self, model: ModelPath) -> int | None:
        if model.version is not None:
            return model.version
        try:
            return self.signature_map(model)[0]
        except grpc.RpcError:
            return None

    def ready(self, model: ModelPath) -> tuple[int, dict[str, Any]]:
        try:
            return readiness(self.metadata(model).model_spec.version.value)
        except grpc.RpcError as error:
            return readiness(None, f"{error.code().name}: {error.details()}")

    def to_messages(self, call: Call) -> tuple[predict_pb2.PredictRequest, predict_pb2.PredictResponse]:
        """A REST call as TF Serving's messages, built from its JSON."""
        rest = call.rest
        if rest is None:
            raise ValueError("a gRPC call has its messages already")
        resolved, signatures = self.signature_map(rest["model"])
        return rest_messages(rest["request"], rest["response"], rest["model"], resolved, signatures)

    # --- feedback ---------------------------------------------------------------------------
    def locate(self, request_id: str) -> Located | None:
        """Where this gateway wrote a request's log: no bucket listing for a recent id."""
        key = self.logger.where(request_id)
        if key is None:
            return None
        entries = self.logs.read_index(key)[1]
        return next(((key, position, entry) for position, entry in enumerate(entries)
                     if entry and entry.request_id == request_id), None)

    def take_feedback(self, name: str, request: Request) -> Reply:
        caller = self.authenticator.caller(request.headers.get("authorization"))
        if caller is None:
            without_tokens = not self.options.credentials and not self.options.tokens_file
            why = ("this gateway takes no feedback: it was started without --feedback-tokens" if without_tokens
                   else "feedback needs a valid 'Authorization: Bearer TOKEN' header")
            return json_reply(401, {"error": why}, {"WWW-Authenticate": 'Bearer realm="feedback"'})
        wait = self.feedback_rate.allow(caller.name)
        if wait:
            return json_reply(429, {"error": f"caller {caller.name} sends feedback faster than "
                                             f"{self.options.feedback_per_minute:g} a minute"},
                              {"Retry-After": str(max(1, round(wait)))})
        body = request.body
        if len(body) > MAX_FEEDBACK_BODY:
            return json_reply(413, {"error": f"a feedback body is at most {MAX_FEEDBACK_BODY} bytes"})
        if name != self.options.model_name:
            return json_reply(404, {"error": f"feedback is taken for model {self.options.model_name!r}, "
                                             f"not {name!r}"})
        try:
            document = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            why = "nested too deeply" if isinstance(error, RecursionError) else str(error)[:200]
            return json_reply(400, {"error": f"the body must be JSON: {why}"})
        if not isinstance(document, dict) or "request_id" not in document or "label" not in document:
            return json_reply(400, {"error": 'expected {"request_id": "...", "label": 0-9, "index": 0}'})
        request_id = document["request_id"]
        try:
            item = record_feedback(self.logs, self.feedback, request_id, document["label"], document.get("index", 0),
                                   source="gateway", locate=self.locate, caller=caller.name, trusted=caller.trusted,
                                   live_check_key=self.options.live_check_key)
        except FeedbackError as error:
            message = str(error)
            if error.http_status == 404 and isinstance(request_id, str) and self.logger.was_unsampled(request_id):
                message = (f"request {request_id} was answered but not sampled for logging "
                           f"(--log-sample-rate {self.options.sample_rate:g}): there is no image to learn from")
            return json_reply(error.http_status, {"error": message})
        except StoreError as error:
            return json_reply(503, {"error": f"the store is unavailable, feedback not recorded: {error}"})
        return json_reply(200, item)


def client_id(given: str | None) -> str:
    """A caller's own request id, kept beside the gateway's when it is one the log can hold."""
    return given if valid_request_id(given) else ""


# --- REST JSON -> TF Serving's messages, for the log -------------------------------------------
def rest_messages(request_body: bytes, response_body: bytes, model: ModelPath, resolved: int, signatures: Any
                  ) -> tuple[predict_pb2.PredictRequest, predict_pb2.PredictResponse]:
    """The tensors TF Serving read from the request's JSON and wrote to the answer's, read back as
    json_tensor.cc reads them."""
    try:
        document = read_document(request_body)
        signature_name = document.get("signature_name") or "serving_default"
        if signature_name not in signatures.signature_def:
            raise Unloggable(f"REST body not logged: no signature {signature_name!r}")
        signature = signatures.signature_def[signature_name]
        inputs, rows = read_predict(document, dtypes(signature.inputs), signature_name)
        answer = parse_document(response_body)
        outputs = (read_rows(answer["predictions"], dtypes(signature.outputs)) if rows else
                   read_columns(answer["outputs"], dtypes(signature.outputs)))
    except (JsonTensorError, KeyError, TypeError, IndexError) as error:
        raise Unloggable(f"REST body not logged: {error}") from None
    request = predict_pb2.PredictRequest()
    fill_spec(request.model_spec, model)
    request.model_spec.signature_name = signature_name
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(to_tensor_proto(value))
    response = predict_pb2.PredictResponse()
    response.model_spec.CopyFrom(model_pb2.ModelSpec(name=model.name, signature_name=signature_name))
    response.model_spec.version.value = resolved
    for key, value in outputs.items():
        response.outputs[key].CopyFrom(to_tensor_proto(value))
    return request, response
