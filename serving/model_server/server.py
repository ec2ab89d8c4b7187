"""A TF-Serving-compatible gRPC server for local runs and CI.

It speaks ``tensorflow.serving.PredictionService`` (Predict, Classify, Regress,
GetModelMetadata) and ``ModelService`` (GetModelStatus, HandleReloadConfigRequest)
on the stubs from tensorflow-serving-api, reads TF Serving's layout and
``models.config`` (``serving/model_server/model_config.py``), keeps versions and labels with
TF Serving's rules (``serving/model_server/manager.py``) and answers with its codes
(``serving/model_server/inference.py``). With ``rest_api_port`` it also answers TF Serving's
REST API (``serving/model_server/rest.py``). Production runs the real ``tensorflow/serving``
image on the same files.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import grpc
from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc, prediction_service_pb2_grpc

from serving.model_server.errors import grpc_code
from serving.model_server.inference import (
    PredictOptions,
    classify,
    model_metadata,
    model_status,
    multi_inference,
    predict,
    regress,
)
from serving.model_server.manager import ModelManager
from serving.model_server.model_config import ConfigRefused, read_model_config_file
from serving.model_server.rest import RestServer
from serving.protocol.http import HttpLimits
from serving.protocol.monitoring import ServingMetrics
from serving.protocol.tf_serving_protos import message_class, read_text_proto
from storage.errors import MnistError

log = logging.getLogger("mnist.serve")


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, manager: ModelManager, options: PredictOptions, metrics: ServingMetrics):
        self.manager, self.options, self.metrics = manager, options, metrics

    def Predict(self, request, context):
        return self.counted("Predict", request, context, lambda: predict(self.manager, request, self.options))

    def Classify(self, request, context):
        return self.counted("Classify", request, context, lambda: classify(self.manager, request, self.options))

    def Regress(self, request, context):
        return self.counted("Regress", request, context, lambda: regress(self.manager, request, self.options))

    def MultiInference(self, request, context):
        with request_errors(context):
            return multi_inference(self.manager, request, self.options)

    def GetModelMetadata(self, request, context):
        with request_errors(context):
            return model_metadata(self.manager, request)

    def counted(self, api: str, request, context, answer):
        """Answer, counting the call as TF Serving does (and per version, as it does not)."""
        start, version, code = time.perf_counter(), None, grpc.StatusCode.OK
        try:
            response = answer()
            version = response.model_spec.version.value
            return response
        except Exception as error:  # noqa: BLE001  becomes the call's status, see abort()
            code = grpc_code(error) if isinstance(error, MnistError) else grpc.StatusCode.INTERNAL
            abort(context, error)
        finally:
            spec = request.model_spec
            self.metrics.observe(spec.name, version, spec.version_label, api, "GRPC", code.name,
                                 time.perf_counter() - start)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager: ModelManager):
        self.manager = manager

    def GetModelStatus(self, request, context):
        with request_errors(context):
            return model_status(self.manager, request)

    def HandleReloadConfigRequest(self, request, context):
        """Validate the whole config before touching anything; a refusal is the RPC's status, as TF Serving's."""
        try:
            self.manager.apply_config(request.config)
        except ConfigRefused as refusal:
            log.error("ReloadConfig failed: %s", refusal)
            context.abort(grpc_code(refusal), str(refusal))
        return model_management_pb2.ReloadConfigResponse()


def abort(context: grpc.ServicerContext, error: Exception) -> None:
    """End the call with the error's status: the family's own (``storage/errors.py``), INTERNAL for
    anything else (a bug must fail one request, not the server). Raises, as ``context.abort`` does."""
    if isinstance(error, MnistError):
        context.abort(grpc_code(error), str(error))
    log.error("request failed: %s: %s", type(error).__name__, error)  # one line, no traceback, as TF Serving
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {error}")


@contextmanager
def request_errors(context: grpc.ServicerContext) -> Iterator[None]:
    try:
        yield
    except Exception as error:  # noqa: BLE001  see abort()
        abort(context, error)


def server_credentials(ssl_config_file: Path) -> grpc.ServerCredentials:
    config = read_text_proto(ssl_config_file, message_class("SSLConfig")())
    if not config.server_key or not config.server_cert:
        raise ValueError(f"{ssl_config_file}: server_key and server_cert are required")
    return grpc.ssl_server_credentials(
        [(config.server_key.encode(), config.server_cert.encode())],
        root_certificates=config.custom_ca.encode() or None, require_client_auth=config.client_verify)


@dataclass
class ServerOptions:
    port: int
    host: str = "127.0.0.1"
    poll_seconds: float = 1.0  # --file_system_poll_wait_seconds: new versions on disk
    # --model_config_file_poll_wait_seconds: 0 reads the config file once, at start, as TF Serving
    config_poll_seconds: float = 0.0
    max_message_bytes: int = 64 * 1024 * 1024  # a batch of 1024 images is 3.2 MB
    rest_max_body_bytes: int = 16 << 20  # REST bodies, as sent and inflated: JSON costs ~60x its size to parse
    ssl_config_file: Path | None = None
    workers: int = 4 * (os.cpu_count() or 1)  # --grpc_max_threads, TF Serving's default
    socket_path: str = ""  # --grpc_socket_path: gRPC on this UNIX socket too
    channel_arguments: list[tuple[str, int | str]] = field(default_factory=list)  # --grpc_channel_arguments
    health_check: bool = False  # --enable_grpc_healthcheck_service
    rest_api_port: int = 0  # 0: no REST API, as in TF Serving
    cors: bool = False  # --rest_api_enable_cors_support
    rest_limits: HttpLimits = field(default_factory=HttpLimits)  # timeouts, connections, --rest_api_num_threads
    predict: PredictOptions = field(default_factory=PredictOptions)
    metrics_path: str | None = None  # --monitoring_config_file's Prometheus path, on the REST port


# The services TF Serving's --enable_grpc_healthcheck_service marks SERVING (server.cc), besides ""
HEALTH_CHECKED_SERVICES = ("ModelService", "PredictionService")


def health_service(server: grpc.Server):
    """grpc.health.v1.Health as TF Serving's default health check service answers it."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    servicer = health.HealthServicer()
    for service in ("", *HEALTH_CHECKED_SERVICES):
        servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


class ModelServer:
    """The gRPC server plus the thread that polls the model directories."""

    def __init__(self, manager: ModelManager, options: ServerOptions, config_file: Path | None = None):
        self.manager, self.options, self.config_file = manager, options, config_file
        self.config_mtime = config_file.stat().st_mtime if config_file else None
        self.config_refused = False
        self.config_refusals = 0  # how many times a config file was refused (retries included)
        arguments = {"grpc.max_receive_message_length": options.max_message_bytes,
                     "grpc.max_send_message_length": options.max_message_bytes, **dict(options.channel_arguments)}
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=options.workers),
                                options=list(arguments.items()))
        self.metrics = ServingMetrics(manager.batch_metrics)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionService(manager, options.predict, self.metrics), self.grpc)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(manager), self.grpc)
        self.health = health_service(self.grpc) if options.health_check else None
        credentials = server_credentials(options.ssl_config_file) if options.ssl_config_file else None

        def listen(address: str) -> int:
            if credentials:
                return self.grpc.add_secure_port(address, credentials)
            return self.grpc.add_insecure_port(address)

        self.port = listen(f"{options.host}:{options.port}")
        if options.socket_path:
            listen(f"unix:{options.socket_path}")
        self.stopping = threading.Event()
        self.poller = threading.Thread(target=self.poll_forever, name="model-poller", daemon=True)
        self.rest = None
        if options.rest_api_port and options.rest_api_port == options.port:  # server.cc BuildAndStart, word for word
            log.error("server_options.http_port cannot be same as grpc_port. Please use a different port for "
                      "HTTP/REST API. Skipped exporting HTTP/REST API.")
        elif options.rest_api_port:
            # JSON spends several bytes per float, so the body limit is a multiple of gRPC's
            self.rest = RestServer(manager, options.host, options.rest_api_port, options.rest_max_body_bytes,
                                   options.predict, self.metrics, options.metrics_path, options.cors,
                                   options.rest_limits)

    def reload_config_if_changed(self) -> None:
        """Re-read models.config when it changes (the sync rewrites it), and retry a refused
        one every config poll, as TF Serving re-reads its config file every
        ``--model_config_file_poll_wait_seconds``: a label refused while its version loads is
        accepted once the version is AVAILABLE. With no period, the file is read once, as there."""
        if not self.config_file or not self.config_file.exists():
            return
        mtime = self.config_file.stat().st_mtime
        if mtime == self.config_mtime and not self.config_refused:
            return
        changed, self.config_mtime = mtime != self.config_mtime, mtime
        try:
            self.manager.apply_config(read_model_config_file(self.config_file))
            self.config_refused = False
        except ValueError as error:  # ConfigRefused too: serving goes on as before
            if changed or not self.config_refused:
                log.error("config %s refused, serving as before and retrying: %s", self.config_file, error)
            self.config_refused = True
            self.config_refusals += 1

    def poll_forever(self) -> None:
        """Each chore on its own period, as TF Serving's two poll threads: the config file
        (``--model_config_file_poll_wait_seconds``) and the model directories
        (``--file_system_poll_wait_seconds``). A period of 0 means done once, at start."""
        chores: list[tuple[float, Callable[[], object]]] = [
            (period, chore) for period, chore in ((self.options.config_poll_seconds, self.reload_config_if_changed),
                                                  (self.options.poll_seconds, self.manager.poll)) if period > 0]
        last_done = [time.monotonic()] * len(chores)
        tick = min((period for period, _ in chores), default=1.0)
        while not self.stopping.wait(tick):
            for index, (period, chore) in enumerate(chores):
                if time.monotonic() - last_done[index] < period:
                    continue
                last_done[index] = time.monotonic()
                try:
                    chore()
                except Exception:  # noqa: BLE001  keep polling whatever one round hit
                    log.exception("poll failed")

    def start(self) -> "ModelServer":
        self.grpc.start()
        self.poller.start()
        if self.rest:
            self.rest.start()
        return self

    def stop(self, grace: float = 5.0) -> None:
        self.stopping.set()
        if self.health:
            self.health.enter_graceful_shutdown()  # NOT_SERVING while the last calls finish
        if self.rest:
            self.rest.stop()
        self.grpc.stop(grace).wait()
