"""The served models, their versions and labels, kept in step with the disk and the config,
with TF Serving's rules (``model_servers/server_core.cc``, ``core/servable_state_monitor.h``).

- Every version the server has known keeps a state (``LOADING``, ``AVAILABLE``, ``END``)
  and a status: an unloaded version is ``END`` with OK. A load that fails is retried
  ``max_num_load_retries`` times, ``load_retry_interval_micros`` apart, the version
  ``LOADING`` meanwhile (``core/loader_harness.cc``, ``util/retrier.cc``); then it is
  ``END`` with the error and not tried again while it stays wanted, as
  ``enable_reload_servables_with_error`` is off in the model server. A version no longer
  wanted (its directory gone, the policy changed) drops its retries, and starts afresh if
  it is wanted again (``aspired_versions_manager.cc``).
- A config is validated whole before anything changes; a refused one leaves models,
  versions and labels as they were. A label may point only at an ``AVAILABLE`` version
  unless ``allow_version_labels_for_unavailable_models``, which still refuses to move a
  label that already points elsewhere (``UpdateModelVersionLabelMap``).
- A new version is loaded before an old one is unloaded, so a switch fails no request,
  and an old one stays while no wanted version could be loaded (availability preserving).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_status_pb2, prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving.model_server.batching import Batcher, BatchingOptions
from serving.model_server.errors import RequestError
from serving.model_server.model_config import ConfigRefused, validate_model_config_list, versions_to_serve
from serving.model_server.session_model import (
    SessionModel,
    SessionSignature,
    load_saved_model,
    meta_graph_with_tags,
)
from serving.model_server.tensors import from_tensor_proto
from serving.protocol.monitoring import BatchingMetrics

log = logging.getLogger("mnist.serve")
DEFAULT_SIGNATURE = "serving_default"
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000  # TF Serving's own limit
State = get_model_status_pb2.ModelVersionStatus.State


@dataclass(frozen=True)
class LoadRetries:
    """TF Serving's --max_num_load_retries and --load_retry_interval_micros (server.h defaults)."""
    max_retries: int = 5
    interval_seconds: float = 60.0


@dataclass
class FailedLoad:
    tries: int
    next_try: float  # time.monotonic()
    message: str


@dataclass
class LoadedVersion:
    version: int
    path: Path
    module: Any  # a TF2 SavedModel's loaded object, or a SessionModel for a TF1 one: both have .signatures
    signature_defs: dict[str, meta_graph_pb2.SignatureDef]
    batching: BatchingOptions | None = None  # --enable_batching
    answering: Callable[[], int] = lambda: 0  # how many requests the server is answering, for the batcher
    batch_metrics: BatchingMetrics | None = None  # the server's, when batching is on
    batchers: dict[str, Batcher] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def function(self, name: str):
        return self.module.signatures[name]

    def runs_as_a_session(self, name: str) -> bool:
        """A TF1 SavedModel's signature (a pruned graph, as Session::Run feeds it): it takes any
        shape its graph takes, as TF Serving's Session does. A TF2 function's own input spec must
        be met before the call: a rank TensorFlow's eager kernels do not expect can abort the process."""
        from tensorflow.python.eager.wrap_function import WrappedFunction

        return isinstance(self.function(name), (WrappedFunction, SessionSignature))

    def call(self, name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call of the signature on these arrays."""
        outputs = self.function(name)(**{key: tf.constant(value) for key, value in inputs.items()})
        return {key: tensor.numpy() for key, tensor in outputs.items()}

    def run(self, name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The signature on these arrays: merged with concurrent calls when batching is on."""
        if self.batching is None:
            return self.call(name, inputs)
        with self.lock:
            if name not in self.batchers:
                self.batchers[name] = Batcher(lambda arrays: self.call(name, arrays), self.batching, self.answering,
                                              self.batch_metrics)
        return self.batchers[name](inputs)

    def unload(self) -> None:
        for batcher in self.batchers.values():
            batcher.stop()
        if isinstance(self.module, SessionModel):
            self.module.close()


@dataclass
class VersionStatus:
    state: int
    error_code: grpc.StatusCode = grpc.StatusCode.OK
    error_message: str = ""


@dataclass
class ServedModel:
    config: model_server_config_pb2.ModelConfig
    versions: dict[int, LoadedVersion] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadOptions:
    """How a version is loaded: TF Serving's --saved_model_tags, --enable_model_warmup with
    --num_request_iterations_for_warmup (0 iterations: no warmup), --enable_batching, and the retries."""
    tags: frozenset[str] = frozenset({"serve"})
    warmup_iterations: int = 1
    batching: BatchingOptions | None = None
    retries: LoadRetries = LoadRetries()


def read_signature_defs(path: Path, tags: frozenset[str]) -> dict[str, meta_graph_pb2.SignatureDef]:
    """Every SignatureDef of the MetaGraph with these tags, as TF Serving's GetModelMetadata lists them."""
    meta_graph = meta_graph_with_tags(path, tags)
    if meta_graph is None:
        raise ValueError(f"{path}: no MetaGraph with tags {{{', '.join(sorted(tags))}}}")
    return dict(meta_graph.signature_def.items())


def warm_up(loaded: LoadedVersion, iterations: int) -> int:
    """Replay the version's warmup PredictionLogs ``iterations`` times each, as TF Serving's
    --enable_model_warmup does (saved_model_warmup_util.cc): more than its 1000 records fail the load."""
    warmup = loaded.path / WARMUP_FILE
    if not warmup.is_file() or iterations < 1:
        return 0
    replayed = 0
    for count, record in enumerate(tf.data.TFRecordDataset(str(warmup)), start=1):
        if count > MAX_WARMUP_RECORDS:
            raise ValueError(f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) at {warmup}")
        request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
        function = loaded.function(request.model_spec.signature_name or DEFAULT_SIGNATURE)
        inputs = {name: tf.constant(from_tensor_proto(proto)) for name, proto in request.inputs.items()}
        for _ in range(iterations):
            function(**inputs)
        replayed += 1
    return replayed


def load_version(path: Path, version: int, options: LoadOptions = LoadOptions(),
                 answering: Callable[[], int] = lambda: 0, batch_metrics: BatchingMetrics | None = None
                 ) -> LoadedVersion:
    module = load_saved_model(path, sorted(options.tags))
    loaded = LoadedVersion(version, path, module, read_signature_defs(path, options.tags), options.batching,
                           answering, batch_metrics)
    replayed = warm_up(loaded, options.warmup_iterations)
    log.info("loaded version %d from %s (%d warmup requests)", version, path, replayed)
    return loaded


# file_system_storage_path_source.cc ParseVersionNumber: absl::SimpleAtoi into an int64, so
# "00000123" is version 123 (TF Serving's own test models are named so), a "+" or spaces around
# read too. A negative number, which that also reads, is left out: no export makes one.
VERSION_NAME = re.compile(r"\s*\+?([0-9]+)\s*")
MAX_VERSION = 2**63 - 1


def version_directories(base_path: Path) -> dict[int, Path]:
    """Version -> directory, as TF Serving lists a base path: every child whose name reads as a
    version number (symbolic links followed), here only once it holds a saved_model.pb. Two names
    of one number: the last in name order is loaded, and both are said, as TF Serving says them."""
    try:
        children = sorted(base_path.iterdir())
    except OSError:
        return {}
    found: dict[int, Path] = {}
    for child in children:
        match = VERSION_NAME.fullmatch(child.name)
        if not match or int(match[1]) > MAX_VERSION or not (child / "saved_model.pb").is_file():
            continue
        version = int(match[1])
        if version in found:
            log.warning("Duplicate version directories detected. Version %d will be loaded from %s, %s will be "
                        "ignored.", version, child.name, found[version].name)
        found[version] = child
    return found


class ModelManager:
    """The served models and their versions, kept in step with the disk."""

    def __init__(self, config: model_server_config_pb2.ModelServerConfig,
                 allow_version_labels_for_unavailable_models: bool = False, loading: LoadOptions = LoadOptions()):
        self.lock = threading.RLock()  # what requests read: held for switches, never for a load
        self.polling = threading.Lock()  # one poll or config switch at a time: the poll thread and a reload
        self.loading = loading
        self.answering_now = 0  # Predict calls received and not yet answered
        self.batch_metrics = BatchingMetrics() if loading.batching else None  # TF Serving's, with batching on
        self.counter_lock = threading.Lock()
        self.allow_unavailable_labels = allow_version_labels_for_unavailable_models
        self.models: dict[str, ServedModel] = {}
        self.labels: dict[str, dict[str, int]] = {}
        self.states: dict[str, dict[int, VersionStatus]] = {}
        self.failed_loads: dict[tuple[str, int], FailedLoad] = {}  # wanted versions whose loads failed
        self.missing_base_paths: set[str] = set()  # said once when it goes missing, once when it is back
        self.apply_config(config)

    # --- config -------------------------------------------------------------
    def checked_labels(self, config: model_server_config_pb2.ModelServerConfig) -> dict[str, dict[str, int]]:
        """The label map ``config`` asks for, or ConfigRefused as TF Serving's UpdateModelVersionLabelMap."""
        labels: dict[str, dict[str, int]] = {}
        for model in config.model_config_list.config:
            states = self.states.get(model.name, {})
            for label, version in model.version_labels.items():
                existing = self.labels.get(model.name, {}).get(label)
                allowed = self.allow_unavailable_labels and (existing is None or existing == version)
                available = version in states and states[version].state == State.AVAILABLE
                if not (allowed or available):
                    raise ConfigRefused(grpc.StatusCode.FAILED_PRECONDITION,
                                        f"Request to assign label to version {version} of model {model.name}, "
                                        "which is not currently available for inference")
                labels.setdefault(model.name, {})[label] = version
        return labels

    def apply_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """Validate the whole config, then switch to it and load what it asks for."""
        validate_model_config_list(config)
        with self.polling:  # a poll under way would load into the models this replaces
            with self.lock:
                labels = self.checked_labels(config)
                current = self.models
                self.models = {c.name: ServedModel(c, current[c.name].versions if c.name in current else {})
                               for c in config.model_config_list.config}
                self.labels = labels
                for name in set(current) - set(self.models):
                    for version in current[name].versions:
                        self.set_state(name, version, VersionStatus(State.END))
                    self.forget_failures(name, set())
                    log.info("unloaded model %s (no longer in the config)", name)
            self.follow_disk()

    # --- versions -------------------------------------------------------------
    def set_state(self, name: str, version: int, status: VersionStatus) -> None:
        self.states.setdefault(name, {})[version] = status

    def load(self, name: str, model: ServedModel, version: int, path: Path) -> None:
        failed = self.failed_loads.get((name, version))
        if failed and (failed.tries > self.loading.retries.max_retries or time.monotonic() < failed.next_try):
            return  # given up on, or its next try is not due
        self.set_state(name, version, VersionStatus(State.LOADING))
        try:
            loaded = load_version(path, version, self.loading, lambda: self.answering_now, self.batch_metrics)
        except Exception as error:  # noqa: BLE001  a broken version must not take the server down
            self.load_failed(name, version, f"{type(error).__name__}: {error}".splitlines()[0])
            return
        self.failed_loads.pop((name, version), None)
        with self.lock:
            model.versions = {**model.versions, version: loaded}
            self.set_state(name, version, VersionStatus(State.AVAILABLE))

    def load_failed(self, name: str, version: int, message: str) -> None:
        """LOADING until the retries are spent, then END with the error (TF Serving's Retry)."""
        failed = self.failed_loads.setdefault((name, version), FailedLoad(0, 0.0, message))
        failed.tries += 1
        failed.next_try = time.monotonic() + self.loading.retries.interval_seconds
        failed.message = message
        log.error("loading %s version %d failed (try %d of %d): %s", name, version, failed.tries,
                  self.loading.retries.max_retries + 1, message)
        if failed.tries > self.loading.retries.max_retries:
            log.error("gave up loading %s version %d: it is not tried again while it stays wanted", name, version)
            self.set_state(name, version, VersionStatus(State.END, grpc.StatusCode.UNKNOWN, message))

    def forget_failures(self, name: str, wanted: set[int]) -> None:
        """A version no longer wanted drops its retries (END with its last error, if still trying);
        wanted again later, it loads afresh (TF Serving manages it anew)."""
        for key in [key for key in self.failed_loads if key[0] == name and key[1] not in wanted]:
            failed = self.failed_loads.pop(key)
            if failed.tries <= self.loading.retries.max_retries:
                self.set_state(name, key[1], VersionStatus(State.END, grpc.StatusCode.UNKNOWN, failed.message))

    def poll(self) -> None:
        """Load what the policy wants and is not loaded, then drop what it no longer wants, one poll
        at a time: two at once would each load the same new version."""
        with self.polling:
            self.follow_disk()

    def follow_disk(self) -> None:
        """``poll``'s work, under ``polling``. Loading first means a request always finds a servable
        version during a switch."""
        for name, model in list(self.models.items()):
            self.note_base_path(name, Path(model.config.base_path))
            directories = version_directories(Path(model.config.base_path))
            wanted = versions_to_serve(model.config, list(directories))
            self.forget_failures(name, wanted)
            for version in sorted(wanted - set(model.versions)):
                self.load(name, model, version, directories[version])
            stale = set(model.versions) - wanted
            if stale and not wanted & set(model.versions):
                continue  # availability preserving, as TF Serving: keep the old until a new one serves
            if stale:
                with self.lock:
                    for version in stale:
                        model.versions[version].unload()
                    model.versions = {v: loaded for v, loaded in model.versions.items() if v not in stale}
                    for version in stale:
                        self.set_state(name, version, VersionStatus(State.END))
                log.info("unloaded %s versions %s", name, sorted(stale))

    def note_base_path(self, name: str, base_path: Path) -> None:
        """Say when a model's base path is missing (as TF Serving names it), and when it is back."""
        missing = not base_path.is_dir()
        if missing and str(base_path) not in self.missing_base_paths:
            log.error("model %s: base path %s does not exist or is not a directory; nothing to serve until it "
                      "does", name, base_path)
            self.missing_base_paths.add(str(base_path))
        elif not missing and str(base_path) in self.missing_base_paths:
            log.info("model %s: base path %s is there now", name, base_path)
            self.missing_base_paths.discard(str(base_path))

    # --- requests -------------------------------------------------------------
    @contextmanager
    def answering(self) -> Iterator[None]:
        """Count a request as being answered until it ends: a batcher runs a request alone in the
        server at once, and closes a batch that holds every request being answered."""
        with self.counter_lock:
            self.answering_now += 1
        try:
            yield
        finally:
            with self.counter_lock:
                self.answering_now -= 1

    def resolve(self, spec) -> tuple[str, LoadedVersion]:
        """The loaded version a ModelSpec asks for, with TF Serving's codes and messages
        (``ServableRequestFromModelSpec``, ``GetModelVersionForLabel``, the manager's NOT_FOUND)."""
        if not spec.name:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified.")
        with self.lock:
            model = self.models.get(spec.name)
            choice = spec.WhichOneof("version_choice")
            if choice == "version_label":
                version = self.labels.get(spec.name, {}).get(spec.version_label)
                if version is None:
                    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"Unrecognized servable version label: {spec.version_label}")
            elif choice == "version":
                version = spec.version.value
            else:
                version = max(model.versions) if model and model.versions else None
            request = (f"Specific({spec.name}, {version})" if choice else f"Latest({spec.name})")
            if model is None or version not in model.versions:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {request}")
            return spec.name, model.versions[version]

    def version_states(self, name: str) -> dict[int, VersionStatus]:
        with self.lock:
            return dict(self.states.get(name, {}))
