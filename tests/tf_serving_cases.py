"""What the TF Serving conformance tests share: the models they serve (half_plus_two, built as TF
Serving's own test model; the MNIST SavedModel), servers on loopback, and the stubs and waits
their checks use."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.model_server.tensors import to_tensor_proto
from storage.embedded import free_port
from tests.conftest import start_model_server, wait_for  # noqa: F401  wait_for: for the test modules
from tests.half_plus_two import export_half_plus_two


@pytest.fixture(scope="module")
def half_plus_two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_half_plus_two(tmp_path_factory.mktemp("hp2") / "model" / "1")


@pytest.fixture()
def hp2_server(half_plus_two: Path, tmp_path: Path):
    with served_with_rest(half_plus_two, tmp_path / "hp2") as served:
        yield served


@contextmanager
def served_with_rest(saved_model: Path, base: Path) -> Iterator[tuple[object, str, str]]:
    """``saved_model`` as version 1 of model ``mnist`` in ``base``, served over gRPC and REST:
    (server, gRPC address, the model's REST URL)."""
    shutil.copytree(saved_model, base / "1")
    rest_port = free_port()
    server, address = start_model_server(base, rest_api_port=rest_port)
    try:
        yield server, address, f"http://127.0.0.1:{rest_port}/v1/models/mnist"
    finally:
        server.stop(grace=1)


@contextmanager
def served_copy(saved_model_dir: Path, tmp_path: Path, **options) -> Iterator[tuple[object, str, Path]]:
    """The MNIST SavedModel as version 1 of a fresh model directory, served with ``options``."""
    base = tmp_path / "models" / "mnist"
    shutil.copytree(saved_model_dir, base / "1")
    server, address = start_model_server(base, **options)
    try:
        yield server, address, base
    finally:
        server.stop(grace=1)


@pytest.fixture()
def mnist_server(saved_model_dir: Path, tmp_path: Path):
    with served_copy(saved_model_dir, tmp_path) as served:
        yield served


def image_request(images: np.ndarray) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.inputs["image"].CopyFrom(to_tensor_proto(images))
    return request


def stub(address: str) -> prediction_service_pb2_grpc.PredictionServiceStub:
    return prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(address))


def model_stub(address: str) -> model_service_pb2_grpc.ModelServiceStub:
    return model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(address))


def rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30)
    return caught.value


def hp2_predict(values: list[float], **spec) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = spec.pop("name", "mnist")
    for key, value in spec.items():
        setattr(request.model_spec, key, value)
    request.inputs["x"].CopyFrom(to_tensor_proto(np.array(values, dtype=np.float32)))
    return request


def status_of(address: str, name: str = "mnist", **spec) -> list[tuple[int, str, int, str]]:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    for key, value in spec.items():
        setattr(request.model_spec, key, value)
    response = model_stub(address).GetModelStatus(request, timeout=30)
    return [(s.version, get_model_status_pb2.ModelVersionStatus.State.Name(s.state), s.status.error_code,
             s.status.error_message) for s in response.model_version_status]


@pytest.fixture(scope="module")
def test_digits(prepared_path: Path) -> np.ndarray:
    from tasks.data import load_test_set

    return load_test_set(prepared_path)[0][:8]
