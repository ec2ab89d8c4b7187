"""A synthetic new source of digits for the demonstration: MNIST training digits rendered
as another scanner and population would give them (thick, slanted strokes, low
resolution, scanner noise, dark ink on light paper), saved as PNG files in ``0/`` ... ``9/``.

    python -m tasks.synthetic OUT_DIR [--count N] [--seed S]

The digits are synthetic: MNIST's own, changed. Only training digits are used, never test ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def thicken(image: np.ndarray) -> np.ndarray:
    """A 3x3 maximum filter: strokes about two pixels wider."""
    padded = np.pad(image, 1)
    return np.max([padded[r:r + 28, c:c + 28] for r in range(3) for c in range(3)], axis=0)


def render(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One MNIST digit (uint8, light on dark) as a 64x64 scan: dark ink on light paper."""
    ink = Image.fromarray(thicken(image))
    shear = rng.uniform(0.25, 0.45)
    ink = ink.transform((28, 28), Image.Transform.AFFINE, (1, shear, -shear * 14, 0, 1, 0),
                        resample=Image.Resampling.BILINEAR)
    ink = ink.resize((14, 14), Image.Resampling.BILINEAR).resize((64, 64), Image.Resampling.NEAREST)
    paper = 235 - np.asarray(ink, dtype=np.float32) * 0.8 + rng.normal(0, 12, (64, 64))
    return Image.fromarray(np.clip(paper, 0, 255).astype(np.uint8))


def write_source(images: np.ndarray, labels: np.ndarray, out_dir: Path, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = out_dir / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        render(image, rng).save(folder / f"scan-{index:05d}.png")
    return len(labels)


def main() -> None:
    from storage.settings import PipelineSettings
    from tasks.data import MNIST_SHA256, read_split

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data_dir = PipelineSettings().data_dir
    if data_dir is None:
        raise SystemExit("set MNIST_DATA_DIR to the MNIST files")
    train, _ = read_split(data_dir, "train", MNIST_SHA256)
    pick = np.random.default_rng(args.seed).choice(len(train.labels), args.count, replace=False)
    written = write_source(train.images[pick], train.labels[pick], args.out_dir, args.seed)
    print(f"wrote {written} synthetic scans to {args.out_dir}")


if __name__ == "__main__":
    main()
