"""Statistics of prepared digits (uint8 [N,28,28]), shared by ingest validation (is a new batch
like MNIST?) and drift detection (is served traffic like what the model was trained for?)."""

from __future__ import annotations

import numpy as np

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
