"""Client inputs prepared the way MNIST digits were, plus .npy arrays.

MNIST's recipe: grayscale, light ink on a dark background, cropped to the ink,
fitted into 20x20 keeping the aspect ratio, then placed in 28x28 so that the
centre of mass sits at the centre.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

try:
    from PIL import Image, UnidentifiedImageError
except ImportError as missing:  # the client's core needs no Pillow; image files do
    raise ImportError("mnist_client.images needs Pillow: pip install 'mnist-client[images]'") from missing

INK_THRESHOLD = 0.2  # of the brightest ink value: below is background noise
# A photo of a digit needs no more (6000x4000, a 24 Mpx camera); Pillow's own bomb limit is about
# 179 Mpx, where a 144 Mpx RGB image it lets through costs about 2 GB to decode.
MAX_PIXELS = 24_000_000


class InputError(ValueError):
    """An input file that cannot become a 28x28 digit; the message names it."""


def ink_on_dark(gray: np.ndarray) -> np.ndarray:
    """Invert when the background (judged by the border) is light."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return 1.0 - gray if np.median(border) > 0.5 else gray


def crop_to_ink(ink: np.ndarray, source: str) -> np.ndarray:
    mask = ink > INK_THRESHOLD * ink.max() if ink.max() > 0 else np.zeros_like(ink, dtype=bool)
    if not mask.any():
        raise InputError(f"{source}: no ink found (blank image)")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def fit_20x20(ink: np.ndarray) -> np.ndarray:
    height, width = ink.shape
    scale = 20.0 / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray((ink * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 255.0


def centre_by_mass(digit: np.ndarray) -> np.ndarray:
    """Place ``digit`` in 28x28 with its centre of mass at (14, 14), clipped to the frame."""
    canvas = np.zeros((28, 28), dtype=np.float32)
    total = digit.sum()
    rows, cols = np.indices(digit.shape)
    centre_row = (rows * digit).sum() / total if total else digit.shape[0] / 2
    centre_col = (cols * digit).sum() / total if total else digit.shape[1] / 2
    top = int(np.clip(round(14 - centre_row), 0, 28 - digit.shape[0]))
    left = int(np.clip(round(14 - centre_col), 0, 28 - digit.shape[1]))
    canvas[top:top + digit.shape[0], left:left + digit.shape[1]] = digit
    return canvas


def prepare_digit(gray: np.ndarray, source: str = "image") -> np.ndarray:
    """Grayscale [0,1] of any size -> float32 [28,28,1] the way MNIST was made."""
    return centre_by_mass(fit_20x20(crop_to_ink(ink_on_dark(gray), source)))[..., np.newaxis]


def read_image(path: Path) -> np.ndarray:
    """A PNG or JPEG (any size, RGB or grayscale) as one prepared [28,28,1] digit."""
    check_readable(path)
    try:
        with warnings.catch_warnings():
            # Pillow's own check (in open, far above ours) warns before it refuses: both refuse here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # reads the header only: the size is known before decoding
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise too_large(path, f"{width}x{height} pixels")
                image.load()
                gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        raise too_large(path, f"{int(pixels[1]):,} pixels" if pixels else "too many pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise InputError(f"{path}: not a readable image ({error})") from None
    return prepare_digit(gray, str(path))


def too_large(path: Path, size: str) -> InputError:
    return InputError(f"{path}: {size}, more than the limit of {MAX_PIXELS:,} "
                      "(a decompression bomb, or a photo to scale down first)")


def read_npy(path: Path) -> np.ndarray:
    """An array of digits: [28,28], [N,28,28], [N,28,28,1] or [N,784]; uint8 0-255 or float 0-1."""
    check_readable(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise InputError(f"{path}: not a readable .npy file ({error})") from None
    return as_digit_batch(array, str(path))


def as_digit_batch(array: np.ndarray, source: str) -> np.ndarray:
    """Digits already 28x28 (MNIST's format) as float32 [N,28,28,1] in [0,1]: uint8 0-255 or float 0-1."""
    shape = list(array.shape)
    if not np.issubdtype(array.dtype, np.number):
        raise InputError(f"{source}: dtype {array.dtype} is not numeric")
    if array.dtype == np.uint8 or (np.issubdtype(array.dtype, np.number) and array.size and array.max() > 1.0):
        array = array.astype(np.float32) / 255.0
    array = np.asarray(array, dtype=np.float32)
    if array.shape == (28, 28):
        array = array[np.newaxis]
    if array.ndim == 2 and array.shape[1] == 784:
        array = array.reshape(-1, 28, 28)
    if array.ndim == 3 and array.shape[1:] == (28, 28):
        array = array[..., np.newaxis]
    if array.ndim != 4 or array.shape[1:] != (28, 28, 1) or array.shape[0] == 0:
        raise InputError(f"{source}: shape {shape} is not [28,28], [N,28,28], [N,28,28,1] or [N,784]")
    if not np.isfinite(array).all():
        raise InputError(f"{source}: contains NaN or infinity")
    return array


def check_readable(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file")


def read_inputs(paths: list[Path]) -> tuple[list[str], np.ndarray]:
    """Names (one per digit) and the stacked [N,28,28,1] batch for files of any supported kind."""
    names: list[str] = []
    batches: list[np.ndarray] = []
    for path in paths:
        if path.suffix.lower() == ".npy":
            array = read_npy(path)
            names += [f"{path}[{index}]" for index in range(len(array))] if len(array) > 1 else [str(path)]
        else:
            array = read_image(path)[np.newaxis]
            names.append(str(path))
        batches.append(array)
    return names, np.concatenate(batches)
