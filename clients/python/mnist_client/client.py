"""A gRPC client for TF Serving's PredictionService and ModelService, without TensorFlow.

Input and output tensor names come from GetModelMetadata, never hard-coded, asked once per
model spec and address and asked again when the server no longer knows them; calls share one
long-lived channel per address, as gRPC means channels to be used (no connection per call);
every call has one deadline, its attempts included; UNAVAILABLE is retried with backoff, and so is
CANCELLED from a server (one shutting down cancels calls it had not started; every call here only
reads), by the channel's retry policy alone, at most ``MAX_ATTEMPTS`` tries a call. ``address``
is ``host:port``, ``dns:///host:port`` (every address the name resolves to) or a
list of ``ip:port``; several replicas are called in turn (gRPC's ``round_robin``),
and a call that finds one gone is retried on another (the channel's retry policy).
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import grpc

from mnist_client._generated.tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

try:
    import numpy as np
except ImportError:  # the core needs no numpy: nested lists in, lists of rows out (mnist_client.plain)
    np = None  # type: ignore[assignment]  # checked before use: numpy is optional here

T = TypeVar("T")
DEFAULT_SIGNATURE = "serving_default"
IMAGES_PER_CALL = 256  # the max_batch_size of serving/deploy/batching_parameters.txt


class ServingError(RuntimeError):
    """A failed call, described in one line (server down, unknown model, bad input...), with the
    call's status code when the server answered."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Target:
    """Where and what to call: address, model and optional version or label."""

    address: str | Sequence[str]
    model_name: str = "mnist"
    version: int | None = None
    label: str | None = None
    timeout: float = 10.0  # for the whole call, every attempt included
    tls: bool = False
    ca_cert: Path | None = None
    signature: str = DEFAULT_SIGNATURE

    def fill_spec(self, spec: Any, with_signature: bool = True) -> None:
        spec.name = self.model_name
        if with_signature:
            spec.signature_name = self.signature
        if self.version is not None:
            spec.version.value = self.version
        elif self.label:
            spec.version_label = self.label


# round_robin over every address, and a retry on another replica when one is UNAVAILABLE (a refused
# connection counts as one) or cancels a call it had not started as it shuts down (gRPC retries only
# statuses from the server or the connection: a caller's own cancel is never retried). The one retry
# layer: 5 tries (gRPC's most) with backoffs drawn below 0.1, 0.2, 0.4 and 0.8 s ride out a restart of
# 0.75 s on average, at most 1.5 s, inside the call's one deadline; a server that stays down is said to
# be unavailable within 1.5 s, before a deadline of 2 s passes.
MAX_ATTEMPTS = 5
SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": "tensorflow.serving.PredictionService"}, {"service": "tensorflow.serving.ModelService"}],
        "retryPolicy": {"maxAttempts": MAX_ATTEMPTS, "initialBackoff": "0.1s", "maxBackoff": "0.8s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]},
    }],
})


def channel_target(address: str | Sequence[str]) -> str:
    """The gRPC target for one address, a ``dns:///`` name, or a list of ``ip:port`` replicas."""
    if isinstance(address, str) and "," not in address:
        return address
    addresses = [a.strip() for a in (address.split(",") if isinstance(address, str) else address) if a.strip()]
    if not addresses:
        raise ServingError("no server address given")
    hosts = [a.rsplit(":", 1)[0].strip("[]") for a in addresses]
    try:
        versions = {ipaddress.ip_address(host).version for host in hosts}
    except ValueError:
        raise ServingError(f"a list of servers must be ip:port addresses ({addresses}); for names use "
                           "dns:///host:port, which reaches every address the name resolves to") from None
    if len(versions) != 1:
        raise ServingError(f"servers {addresses}: mix of IPv4 and IPv6 addresses")
    return f"ipv{versions.pop()}:" + ",".join(addresses)


def open_channel(target: Target) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
               ("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1),
               # a kept channel whose server was down tries again within a second of its return, not
               # after gRPC's default backoff of up to two minutes
               ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
               ("grpc.max_reconnect_backoff_ms", 1000)]
    if not target.tls:
        return grpc.insecure_channel(channel_target(target.address), options=options)
    root = target.ca_cert.read_bytes() if target.ca_cert else None
    return grpc.secure_channel(channel_target(target.address), grpc.ssl_channel_credentials(root_certificates=root),
                               options=options)


def unary_call(call: Callable[..., T], request: Any, target: Target) -> T:
    """One call under ``target``'s deadline; its retries are the channel's (``SERVICE_CONFIG``), not a
    loop here, which would multiply theirs and start each try with a fresh deadline."""
    try:
        return call(request, timeout=target.timeout)
    except grpc.RpcError as error:
        raise ServingError(describe(error, target), error.code()) from None


def describe(error: grpc.RpcError, target: Target) -> str:
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"server at {target.address} is unavailable ({error.details()})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"server at {target.address} did not answer within {target.timeout:g}s"
    return f"{code.name}: {error.details()}"


SHARED_CHANNELS = 16  # addresses with a channel kept open; past that the least recently used is let go
_shared_lock = threading.Lock()
_shared_channels: OrderedDict[tuple, grpc.Channel] = OrderedDict()
_tensor_names: dict[tuple, tuple[str, str]] = {}


def channel_key(target: Target) -> tuple:
    address = target.address if isinstance(target.address, str) else tuple(target.address)
    return address, target.tls, str(target.ca_cert) if target.ca_cert else None


def shared_channel(target: Target) -> grpc.Channel:
    """The channel kept for ``target``'s address and credentials. gRPC reconnects it when the
    server comes back; one let go is closed by gRPC once no call uses it."""
    key = channel_key(target)
    with _shared_lock:
        channel = _shared_channels.get(key)
        if channel is None:
            channel = _shared_channels[key] = open_channel(target)
            while len(_shared_channels) > SHARED_CHANNELS:
                _shared_channels.popitem(last=False)
        _shared_channels.move_to_end(key)
        return channel


def tensor_names(channel: grpc.Channel, target: Target, fresh: bool = False) -> tuple[str, str]:
    """(input name, output name) of ``target``'s signature, from GetModelMetadata once per
    address and model spec (``fresh``: asked again)."""
    key = (channel_key(target), target.model_name, target.version, target.label, target.signature)
    names = None if fresh else _tensor_names.get(key)
    if names is None:
        names = signature_io(channel, target)[:2]
        with _shared_lock:
            if len(_tensor_names) > 1000:  # specs come from callers: keep the cache bounded
                _tensor_names.clear()
            _tensor_names[key] = names
    return names


def renamed(error: ServingError) -> bool:
    """The server no longer knows a tensor name asked for (predict_util.cc's words): a new version
    whose signature names its tensors otherwise."""
    return error.code == grpc.StatusCode.INVALID_ARGUMENT and "alias not found in signature" in str(error)


def signature_io(channel: grpc.Channel, target: Target) -> tuple[str, str, int]:
    """(input name, output name, version) read from GetModelMetadata."""
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    target.fill_spec(request.model_spec)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    response = unary_call(stub.GetModelMetadata, request, target)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    if target.signature not in signatures.signature_def:
        raise ServingError(f"model {target.model_name!r} has no signature {target.signature!r}")
    signature = signatures.signature_def[target.signature]
    if len(signature.inputs) != 1 or len(signature.outputs) != 1:
        raise ServingError(f"signature {target.signature!r} must have one input and one output")
    return next(iter(signature.inputs)), next(iter(signature.outputs)), response.model_spec.version.value


def image_tensor(images: Any) -> Any:
    """float32 [N,28,28,1] as TF Serving's TensorProto: numpy arrays (or anything numpy takes) when
    numpy is installed, else nested lists."""
    if np is None:
        from mnist_client.plain import float_tensor

        return float_tensor(images)
    from mnist_client.tensors import to_tensor_proto

    return to_tensor_proto(np.asarray(images, dtype=np.float32))


def output_values(proto: Any) -> Any:
    """An answer tensor: a numpy array when numpy is installed, else a list of rows."""
    if np is None:
        from mnist_client.plain import float_rows

        return float_rows(proto)
    from mnist_client.tensors import from_tensor_proto

    return from_tensor_proto(proto)


@dataclass(frozen=True)
class Prediction:
    probabilities: Any  # [N, 10]: a numpy array, or a list of rows where numpy is not installed
    version: int  # the version that answered
    request_id: str | None  # the logging gateway's id for this call (None straight from TF Serving)


REQUEST_ID = "x-request-id"


def predict_call(images: Any, target: Target, channel: grpc.Channel | None = None,
                 request_id: str | None = None) -> Prediction:
    """Class probabilities for images [N,28,28,1] in [0,1], the version that answered and the
    request id a logging gateway gave the call (``request_id`` sends the caller's own)."""
    channel = channel or shared_channel(target)
    tensor = image_tensor(images)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    metadata = ((REQUEST_ID, request_id),) if request_id else None
    for fresh in (False, True):
        input_name, output_name = tensor_names(channel, target, fresh)
        request = predict_pb2.PredictRequest()
        target.fill_spec(request.model_spec)
        request.inputs[input_name].CopyFrom(tensor)
        request.output_filter.append(output_name)
        try:
            response, call = unary_call(
                lambda r, timeout: stub.Predict.with_call(r, timeout=timeout, metadata=metadata), request, target)
        except ServingError as error:
            if fresh or not renamed(error):
                raise
            continue  # the names were a previous version's: ask again, once
        trailers = dict(call.trailing_metadata() or ())
        return Prediction(output_values(response.outputs[output_name]), response.model_spec.version.value,
                          trailers.get(REQUEST_ID))
    raise AssertionError("unreachable")


def predict_probabilities(images: Any, target: Target, channel: grpc.Channel | None = None
                          ) -> tuple[Any, int]:
    """Class probabilities [N,10] for images [N,28,28,1] in [0,1], and the version that answered."""
    answer = predict_call(images, target, channel)
    return answer.probabilities, answer.version


def predict(images: Any, *, address: str | Sequence[str], model_name: str = "mnist", version: int | None = None,
            label: str | None = None, timeout: float = 10.0, tls: bool = False,
            ca_cert: Path | None = None, names: list[str] | None = None,
            request_id: str | None = None, images_per_call: int = IMAGES_PER_CALL) -> list[dict[str, Any]]:
    """Digits for images [N,28,28,1] in [0,1] (a numpy array, or nested lists where numpy is not
    installed): one dict per image with ``input``, ``digit``,
    ``confidence``, ``top3``, the ``version`` that answered and, through the logging gateway, the
    call's ``request_id`` and the image's ``index`` in it (what feedback names).

    At most ``images_per_call`` images go in one Predict: TF Serving refuses a call larger than its
    batching ``max_batch_size`` (INVALID_ARGUMENT, "Task size N is larger than maximum input batch
    size"). With more, each call gets its own request id (``request_id`` + ".1", ".2"... when given)."""
    if images_per_call < 1:
        raise ValueError(f"images_per_call must be at least 1, got {images_per_call}")
    target = Target(address, model_name, version, label, timeout, tls=tls, ca_cert=ca_cert)
    names = names or [str(index) for index in range(len(images))]
    results: list[dict[str, Any]] = []
    for call, start in enumerate(range(0, max(len(images), 1), images_per_call)):
        call_id = request_id if not request_id or len(images) <= images_per_call \
            else f"{request_id[:120]}.{call + 1}"
        answer = predict_call(images[start:start + images_per_call], target, request_id=call_id)
        results += digit_results(answer, names[start:start + images_per_call])
    return results


def digit_results(answer: Prediction, names: list[str]) -> list[dict[str, Any]]:
    """One dict per image of one call; ``index`` is the image's place in that call."""
    results = []
    for index, (name, row) in enumerate(zip(names, answer.probabilities)):
        order = sorted(range(len(row)), key=lambda digit: float(row[digit]), reverse=True)[:3]
        result = {"input": name, "digit": int(order[0]), "confidence": float(row[order[0]]),
                  "top3": [{"digit": int(d), "probability": float(row[d])} for d in order],
                  "version": answer.version}
        if answer.request_id:
            result |= {"request_id": answer.request_id, "index": index}
        results.append(result)
    return results


def model_status(target: Target) -> list[tuple[int, str]]:
    """(version, state name) for the versions the server reports."""
    request = get_model_status_pb2.GetModelStatusRequest()
    target.fill_spec(request.model_spec, with_signature=False)
    with open_channel(target) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        response = unary_call(stub.GetModelStatus, request, target)
    return [(status.version, get_model_status_pb2.ModelVersionStatus.State.Name(status.state))
            for status in response.model_version_status]


def wait_for_label(target: Target, version: int | None, timeout: float) -> int | None:
    """Poll GetModelMetadata for ``target``'s label until it names ``version`` (any version, if
    None), or ``timeout`` passes; returns the version the label last named, None if the server did
    not know it. TF Serving takes a label only once its version is AVAILABLE, at its next config
    poll: a label asked for in between is "Unrecognized", though the version already answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            named: int | None = signature_io(shared_channel(target), target)[2]
        except ServingError:
            named = None  # not known yet, or the server is restarting: keep asking
        if (named is not None and version in (None, named)) or time.monotonic() > deadline:
            return named
        time.sleep(0.2)


def wait_until_available(target: Target, versions: list[int], timeout: float) -> dict[int, str]:
    """Poll GetModelStatus until every one of ``versions`` is AVAILABLE, or has ended (END after
    being seen loading or served during this wait: a load that failed after its retries, or an
    unload), or ``timeout`` passes; returns the states last reported (compare them with
    ``versions`` to tell which). An END not seen to begin here may be a past life of the version
    that the server has yet to poll again, so it is waited on."""
    deadline = time.monotonic() + timeout
    seen_live: set[int] = set()
    while True:
        try:
            states = dict(model_status(target))
        except ServingError:
            states = {}  # not loaded yet (NOT_FOUND) or the server is restarting: keep asking
        seen_live |= {version for version in versions if states.get(version) not in (None, "END")}
        settled = all(states.get(version) == "AVAILABLE" or (states.get(version) == "END" and version in seen_live)
                      for version in versions)
        if settled or time.monotonic() > deadline:
            return states
        time.sleep(0.5)
