"""Digits as the pipeline reads them: statistics of prepared digits (uint8 [N,28,28]), shared by
ingest validation (is a new batch like MNIST?) and drift detection (is served traffic like what
the model was trained for?), and the digits of a logged request, read by drift, feedback and
monitoring."""

from __future__ import annotations

import numpy as np

from mnist_client.images import InputError, as_digit_batch
from mnist_client.protos import prediction_log_pb2
from mnist_client.tensors import from_tensor_proto

INK_LEVEL = 51  # uint8: what counts as ink (0.2 of full scale, as the client's crop)


def ink_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per digit: the fraction of ink pixels, the mean intensity of the ink, and the stroke
    bounding box's height, width and area in pixels."""
    images = np.asarray(images)
    ink = images >= INK_LEVEL
    rows, cols = np.asarray(ink.any(axis=2)), np.asarray(ink.any(axis=1))
    height = np.where(rows.any(axis=1), 28 - rows[:, ::-1].argmax(axis=1) - rows.argmax(axis=1), 0)
    width = np.where(cols.any(axis=1), 28 - cols[:, ::-1].argmax(axis=1) - cols.argmax(axis=1), 0)
    ink_pixels = ink.sum(axis=(1, 2))
    intensity = np.where(ink_pixels > 0, (images * ink).sum(axis=(1, 2)) / np.maximum(ink_pixels, 1) / 255.0, 0.0)
    return {"ink_fraction": ink.mean(axis=(1, 2)), "intensity": intensity.astype(np.float64),
            "box_height": height.astype(np.float64), "box_width": width.astype(np.float64),
            "box_area": (height * width).astype(np.float64)}


def logged_digits(record: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """The request's images (float [N,28,28,1]) and, when logged, the answered probabilities [N,10]."""
    log = prediction_log_pb2.PredictionLog.FromString(record)
    inputs = list(log.predict_log.request.inputs.values())
    if len(inputs) != 1:
        raise InputError(f"the logged request has {len(inputs)} inputs, expected one image tensor")
    images = as_digit_batch(from_tensor_proto(inputs[0]), "logged request")
    outputs = list(log.predict_log.response.outputs.values())
    return images, (from_tensor_proto(outputs[0]) if len(outputs) == 1 else None)
