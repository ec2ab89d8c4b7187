"""A TF-Serving-compatible gRPC server for local runs and CI.

It speaks ``tensorflow.serving.PredictionService`` (Predict, GetModelMetadata)
and ``ModelService`` (GetModelStatus, HandleReloadConfigRequest) on the stubs
from tensorflow-serving-api, reads TF Serving's layout and ``models.config``
(version policy latest / all / specific, version labels), polls for new
versions, loads a new version before it unloads an old one, and replays
``assets.extra/tf_serving_warmup_requests`` on load. With ``rest_api_port`` it
also answers TF Serving's REST API (``serving/rest.py``). Production runs the
real ``tensorflow/serving`` image on the same files.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2, get_model_status_pb2, model_management_pb2, model_service_pb2_grpc, predict_pb2,
    prediction_log_pb2, prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from storage.models import local_versions
from serving.tensors import TensorError, from_tensor_proto, to_tensor_proto
from serving.tf_serving_protos import message_class

log = logging.getLogger("mnist.serve")
DEFAULT_SIGNATURE = "serving_default"
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000  # TF Serving's own limit


class RequestError(Exception):
    """A request problem with the gRPC status code it maps to."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class LoadedVersion:
    version: int
    path: Path
    module: object
    signature_defs: dict[str, meta_graph_pb2.SignatureDef]

    def signature(self, name: str) -> tuple[meta_graph_pb2.SignatureDef, object]:
        if name not in self.signature_defs:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"signature {name!r} not found; available: {sorted(self.signature_defs)}")
        return self.signature_defs[name], self.module.signatures[name]


@dataclass
class ServedModel:
    config: model_server_config_pb2.ModelConfig
    versions: dict[int, LoadedVersion] = field(default_factory=dict)


def read_signature_defs(path: Path) -> dict[str, meta_graph_pb2.SignatureDef]:
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((path / "saved_model.pb").read_bytes())
    return {name: sig for name, sig in saved_model.meta_graphs[0].signature_def.items()
            if not name.startswith("__")}


def run_signature(loaded: LoadedVersion, signature_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    _, function = loaded.signature(signature_name)
    outputs = function(**{name: tf.constant(value) for name, value in inputs.items()})
    return {name: tensor.numpy() for name, tensor in outputs.items()}


def warm_up(loaded: LoadedVersion) -> int:
    """Replay the version's warmup PredictionLogs, as TF Serving's --enable_model_warmup does."""
    warmup = loaded.path / WARMUP_FILE
    if not warmup.is_file():
        return 0
    replayed = 0
    for record in tf.data.TFRecordDataset(str(warmup)).take(MAX_WARMUP_RECORDS):
        entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = entry.predict_log.request
        inputs = {name: from_tensor_proto(proto) for name, proto in request.inputs.items()}
        run_signature(loaded, request.model_spec.signature_name or DEFAULT_SIGNATURE, inputs)
        replayed += 1
    return replayed


def load_version(path: Path, version: int) -> LoadedVersion:
    loaded = LoadedVersion(version, path, tf.saved_model.load(str(path)), read_signature_defs(path))
    replayed = warm_up(loaded)
    log.info("loaded version %d from %s (%d warmup requests)", version, path, replayed)
    return loaded


def servable_versions(base_path: Path) -> list[int]:
    """Version directories that hold a SavedModel."""
    return [v for v in local_versions(base_path) if (base_path / str(v) / "saved_model.pb").is_file()]


def versions_to_serve(config: model_server_config_pb2.ModelConfig, available: list[int]) -> set[int]:
    """Apply the model_version_policy: latest N (default 1), all, or specific."""
    policy = config.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return set(available)
    if choice == "specific":
        return set(policy.specific.versions) & set(available)
    count = policy.latest.num_versions if choice == "latest" and policy.latest.num_versions else 1
    return set(sorted(available)[-count:])


def single_model_config(name: str, base_path: Path) -> model_server_config_pb2.ModelServerConfig:
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name, model.base_path, model.model_platform = name, str(base_path), "tensorflow"
    return config


def read_model_config_file(path: Path) -> model_server_config_pb2.ModelServerConfig:
    try:
        return text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
    except (OSError, text_format.ParseError) as error:
        raise ValueError(f"{path}: not a valid ModelServerConfig text proto ({error})") from error


class ModelManager:
    """The served models and their versions, kept in step with the disk."""

    def __init__(self, config: model_server_config_pb2.ModelServerConfig):
        self.lock = threading.Lock()
        self.models: dict[str, ServedModel] = {}
        self.apply_config(config)

    def apply_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        if config.WhichOneof("config") != "model_config_list":
            raise ValueError("only model_config_list configs are supported")
        with self.lock:
            current = self.models
            self.models = {c.name: ServedModel(c, current[c.name].versions if c.name in current else {})
                           for c in config.model_config_list.config}
        self.poll()

    def poll(self) -> None:
        """Load what the policy wants and is not loaded, then drop what it no longer wants.
        Loading first means a request always finds a servable version during a switch."""
        for name, model in list(self.models.items()):
            wanted = versions_to_serve(model.config, servable_versions(Path(model.config.base_path)))
            for version in sorted(wanted - set(model.versions)):
                try:
                    loaded = load_version(Path(model.config.base_path) / str(version), version)
                except Exception:  # a broken version must not take the server down
                    log.exception("could not load %s version %d", name, version)
                    continue
                with self.lock:
                    model.versions = {**model.versions, version: loaded}
            stale = set(model.versions) - wanted
            if stale:
                with self.lock:
                    model.versions = {v: loaded for v, loaded in model.versions.items() if v not in stale}
                log.info("unloaded %s versions %s", name, sorted(stale))

    def resolve(self, spec) -> tuple[str, LoadedVersion]:
        """The loaded version a ModelSpec asks for: explicit version, label, or the newest."""
        model = self.models.get(spec.name)
        if model is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"model {spec.name!r} is not served")
        versions = model.versions
        if spec.HasField("version"):
            wanted = spec.version.value
        elif spec.version_label:
            if spec.version_label not in model.config.version_labels:
                raise RequestError(grpc.StatusCode.NOT_FOUND,
                                   f"model {spec.name!r} has no version label {spec.version_label!r}")
            wanted = model.config.version_labels[spec.version_label]
        else:
            if not versions:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"model {spec.name!r} has no loaded version")
            wanted = max(versions)
        if wanted not in versions:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"model {spec.name!r} version {wanted} is not loaded")
        return spec.name, versions[wanted]


def validate_inputs(signature: meta_graph_pb2.SignatureDef, request: predict_pb2.PredictRequest
                    ) -> dict[str, np.ndarray]:
    """Every problem is INVALID_ARGUMENT with a message naming it."""
    expected, given = set(signature.inputs), set(request.inputs)
    if given != expected:
        missing, unknown = sorted(expected - given), sorted(given - expected)
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"inputs must be exactly {sorted(expected)}; missing {missing}, unknown {unknown}")
    arrays = {}
    for name, info in signature.inputs.items():
        try:
            array = from_tensor_proto(request.inputs[name])
        except TensorError as error:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"input {name!r}: {error}") from None
        required = [dim.size for dim in info.tensor_shape.dim]
        if len(array.shape) != len(required) or any(r not in (-1, a) for r, a in zip(required, array.shape)) \
                or array.shape[0] == 0:
            shown = ["N" if r == -1 else r for r in required]
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"input {name!r} has shape {list(array.shape)}, expected {shown} with N >= 1")
        if not np.isfinite(array).all():
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"input {name!r} contains NaN or infinity")
        arrays[name] = array
    return arrays


def predict(manager: ModelManager, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    """Predict, shared by the gRPC and REST front ends; raises RequestError."""
    name, loaded = manager.resolve(request.model_spec)
    signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
    signature, _ = loaded.signature(signature_name)
    outputs = run_signature(loaded, signature_name, validate_inputs(signature, request))
    unknown = set(request.output_filter) - set(outputs)
    if unknown:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"output_filter names unknown outputs {sorted(unknown)}")
    response = predict_pb2.PredictResponse()
    response.model_spec.name, response.model_spec.signature_name = name, signature_name
    response.model_spec.version.value = loaded.version
    for key, value in outputs.items():
        if not request.output_filter or key in request.output_filter:
            response.outputs[key].CopyFrom(to_tensor_proto(value))
    return response


def model_metadata(manager: ModelManager, request: get_model_metadata_pb2.GetModelMetadataRequest
                   ) -> get_model_metadata_pb2.GetModelMetadataResponse:
    if list(request.metadata_field) != ["signature_def"]:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"metadata_field must be ['signature_def'], got {list(request.metadata_field)}")
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
    spec = request.model_spec
    model = manager.models.get(spec.name)
    if model is None:
        raise RequestError(grpc.StatusCode.NOT_FOUND, f"model {spec.name!r} is not served")
    versions = sorted(model.versions)
    if spec.HasField("version") or spec.version_label:
        versions = [manager.resolve(spec)[1].version]
    response = get_model_status_pb2.GetModelStatusResponse()
    for version in versions:
        status = response.model_version_status.add()
        status.version = version
        status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    return response


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, manager: ModelManager):
        self.manager = manager

    def Predict(self, request, context):
        with request_errors(context):
            return predict(self.manager, request)

    def GetModelMetadata(self, request, context):
        with request_errors(context):
            return model_metadata(self.manager, request)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager: ModelManager):
        self.manager = manager

    def GetModelStatus(self, request, context):
        with request_errors(context):
            return model_status(self.manager, request)

    def HandleReloadConfigRequest(self, request, context):
        response = model_management_pb2.ReloadConfigResponse()
        try:
            self.manager.apply_config(request.config)
        except ValueError as error:
            response.status.error_code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            response.status.error_message = str(error)
        return response


@contextmanager
def request_errors(context: grpc.ServicerContext) -> Iterator[None]:
    """RequestError becomes its gRPC status; anything else INTERNAL. The server stays up."""
    try:
        yield
    except RequestError as error:
        context.abort(error.code, str(error))
    except Exception as error:  # noqa: BLE001  a bug must fail one request, not the server
        log.exception("request failed")
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {error}")


def server_credentials(ssl_config_file: Path) -> grpc.ServerCredentials:
    config = text_format.Parse(ssl_config_file.read_text(), message_class("SSLConfig")())
    if not config.server_key or not config.server_cert:
        raise ValueError(f"{ssl_config_file}: server_key and server_cert are required")
    return grpc.ssl_server_credentials(
        [(config.server_key.encode(), config.server_cert.encode())],
        root_certificates=config.custom_ca.encode() or None, require_client_auth=config.client_verify)


@dataclass
class ServerOptions:
    port: int
    host: str = "127.0.0.1"
    poll_seconds: float = 1.0
    max_message_bytes: int = 64 * 1024 * 1024  # a batch of 1024 images is 3.2 MB
    ssl_config_file: Path | None = None
    workers: int = 8
    rest_api_port: int = 0  # 0: no REST API, as in TF Serving


class ModelServer:
    """The gRPC server plus the thread that polls the model directories."""

    def __init__(self, manager: ModelManager, options: ServerOptions, config_file: Path | None = None):
        self.manager, self.options, self.config_file = manager, options, config_file
        self.config_mtime = config_file.stat().st_mtime if config_file else None
        limits = [("grpc.max_receive_message_length", options.max_message_bytes),
                  ("grpc.max_send_message_length", options.max_message_bytes)]
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=options.workers), options=limits)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(manager), self.grpc)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(manager), self.grpc)
        address = f"{options.host}:{options.port}"
        if options.ssl_config_file:
            self.port = self.grpc.add_secure_port(address, server_credentials(options.ssl_config_file))
        else:
            self.port = self.grpc.add_insecure_port(address)
        self.stopping = threading.Event()
        self.poller = threading.Thread(target=self.poll_forever, name="model-poller", daemon=True)
        self.rest = None
        if options.rest_api_port:
            from serving.rest import RestServer  # here: rest.py builds on this module

            # JSON spends several bytes per float, so the body limit is a multiple of gRPC's
            self.rest = RestServer(manager, options.host, options.rest_api_port, 8 * options.max_message_bytes)

    def reload_config_if_changed(self) -> None:
        """Re-read models.config when it changes (the sync rewrites it for new labels)."""
        if not self.config_file or not self.config_file.exists():
            return
        mtime = self.config_file.stat().st_mtime
        if mtime != self.config_mtime:
            self.config_mtime = mtime
            try:
                self.manager.apply_config(read_model_config_file(self.config_file))
            except ValueError as error:
                log.error("ignoring changed config: %s", error)

    def poll_forever(self) -> None:
        while not self.stopping.wait(self.options.poll_seconds):
            try:
                self.reload_config_if_changed()
                self.manager.poll()
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
        if self.rest:
            self.rest.stop()
        self.grpc.stop(grace).wait()
