"""Export stage: a TF Serving SavedModel in ``<base>/<model_name>/<version>/``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from storage.errors import MnistError
from storage.models import local_versions
from tasks.model import INPUT_NAME

SIGNATURE_NAME = "serving_default"
OUTPUT_NAME = "probabilities"
# A second signature: the hidden layer's activations, which the data screen clusters per label
# (tasks/screen.py). Clients keep calling serving_default; TF Serving serves both.
FEATURES_SIGNATURE = "features"
FEATURES_OUTPUT = "features"
ROUND_TRIP_TOLERANCE = 1e-5


class ExportError(MnistError, RuntimeError):
    """The exported SavedModel does not reproduce the Keras model."""


def next_local_version(model_dir: Path) -> int:
    return max(local_versions(model_dir), default=0) + 1


def write_warmup_requests(saved_model_dir: Path, images: np.ndarray, batch_sizes: tuple[int, ...] = (1, 8, 32)) -> Path:
    """``assets.extra/tf_serving_warmup_requests``: PredictionLogs of real test images,
    which TF Serving and the local server replay with --enable_model_warmup (on by default)."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    from serving.model_server.tensors import to_tensor_proto

    path = saved_model_dir / "assets.extra" / "tf_serving_warmup_requests"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for size in batch_sizes:
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = SIGNATURE_NAME
            request.inputs[INPUT_NAME].CopyFrom(to_tensor_proto(images[:size]))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return path


def export_saved_model(model: keras.Model, destination: Path, warmup_images: np.ndarray | None = None,
                       reference: dict | None = None) -> Path:
    """Write the ``serving_default`` signature: float32 ``image`` [N,28,28,1] -> ``probabilities`` [N,10].

    ``keras.export.ExportArchive`` is what ``model.export(format="tf_saved_model")``
    runs; using it directly lets us name the output tensor instead of ``output_0``.
    The SavedModel is written beside its destination and renamed into place, so
    TF Serving, which loads a version directory as soon as it appears, never sees
    a partial one.
    """
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name=SIGNATURE_NAME,
        fn=lambda image: {OUTPUT_NAME: model(image, training=False)},
        input_signature=[tf.TensorSpec(shape=(None, 28, 28, 1), dtype=tf.float32, name=INPUT_NAME)],
    )
    hidden = keras.Model(model.inputs, penultimate(model).output)
    archive.add_endpoint(
        name=FEATURES_SIGNATURE,
        fn=lambda image: {FEATURES_OUTPUT: hidden(image, training=False)},
        input_signature=[tf.TensorSpec(shape=(None, 28, 28, 1), dtype=tf.float32, name=INPUT_NAME)],
    )
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.{os.getpid()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    archive.write_out(str(staging), verbose=False)
    if warmup_images is not None:
        write_warmup_requests(staging, warmup_images)
    if reference is not None:
        from tasks.drift import write_reference

        write_reference(staging, reference)
    staging.rename(destination)
    return destination


def penultimate(model: keras.Model) -> keras.layers.Layer:
    """The last layer before the output (and its dropout): the representation the classifier reads."""
    hidden = [layer for layer in model.layers[:-1] if not isinstance(layer, keras.layers.Dropout)]
    return hidden[-1]


Predictor = Callable[[np.ndarray], np.ndarray]


def saved_model_callables(saved_model_dir: Path) -> tuple[Predictor, Predictor | None]:
    """The SavedModel loaded once: images -> probabilities, and images -> hidden activations
    (None for versions exported before the ``features`` signature existed)."""
    signatures = tf.saved_model.load(str(saved_model_dir)).signatures

    def call(name: str, output: str) -> Predictor:
        signature = signatures[name]
        return lambda images: signature(**{INPUT_NAME: tf.constant(images, dtype=tf.float32)})[output].numpy()

    features = call(FEATURES_SIGNATURE, FEATURES_OUTPUT) if FEATURES_SIGNATURE in signatures else None
    return call(SIGNATURE_NAME, OUTPUT_NAME), features


def saved_model_predictor(saved_model_dir: Path) -> Predictor:
    """The SavedModel's serving signature, loaded once, as images -> probabilities."""
    return saved_model_callables(saved_model_dir)[0]


def saved_model_predict(saved_model_dir: Path, images: np.ndarray) -> np.ndarray:
    return saved_model_predictor(saved_model_dir)(images)


def verify_round_trip(model: keras.Model, saved_model_dir: Path, images: np.ndarray,
                      expected: np.ndarray | None = None) -> float:
    """Reload the export and compare with Keras (``expected``: its answers, when already at hand);
    return the max abs difference."""
    if expected is None:
        expected = model.predict(images, verbose=0)
    actual = saved_model_predict(saved_model_dir, images)
    difference = float(np.max(np.abs(expected - actual)))
    if actual.shape != expected.shape or difference > ROUND_TRIP_TOLERANCE:
        raise ExportError(
            f"{saved_model_dir}: SavedModel differs from the Keras model by {difference:.2e} "
            f"(shape {actual.shape} vs {expected.shape}, tolerance {ROUND_TRIP_TOLERANCE})"
        )
    return difference


# --- Prefect task -------------------------------------------------------------
from prefect import get_run_logger, task  # noqa: E402

from tasks.results import ExportedModel  # noqa: E402


@task(name="export", timeout_seconds=600)
def export(model_path: str, prepared_path: str, base_dir: str, model_name: str) -> ExportedModel:
    """Export the next version under ``base_dir/model_name`` and verify it on 100 test images."""
    from tasks.data import load_test_set
    from tasks.drift import REFERENCE_SAMPLE, reference_statistics
    from tasks.model import load_saved_model

    model = load_saved_model(model_path)
    model_dir = Path(base_dir) / model_name
    version = next_local_version(model_dir)
    x_test, _ = load_test_set(Path(prepared_path))
    sample = x_test[:REFERENCE_SAMPLE]  # what the drift flow compares served traffic with
    probabilities = model.predict(sample, verbose=0, batch_size=500)
    reference = reference_statistics(sample, probabilities, f"MNIST test set, first {len(sample)} digits")
    destination = export_saved_model(model, model_dir / str(version), warmup_images=x_test[:32], reference=reference)
    # Keras's answers for the round trip are the reference's first hundred: no second predict to trace
    difference = verify_round_trip(model, destination, x_test[:100], probabilities[:100])
    get_run_logger().info("exported %s (round trip max difference %.1e)", destination, difference)
    return ExportedModel(path=str(destination), version=version)
