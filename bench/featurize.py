"""Featurize throughput in images/s for both formats, on real sample images.

    python bench/featurize.py [--sample DIR] [--scans 1000]

idx: images.convert_batch (the conversion every upload gets) over the sample tiled to the full dataset's
30,222 images.
scans: datasets.convert_scans (decode + images.convert, all cores) over a temporary scans tree made from
sample images: enlarged to 100-400 px, dark ink on tinted paper, PNG and JPEG.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from oracle_mnist.datasets import IDX_FILES, convert_scans, read_idx_split, workers
from oracle_mnist.images import convert, convert_batch

# The tinted scans are the tests' rendition (tests/helpers.py); tests/ is not a package, so it goes on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import tint

FULL_DATASET = 30_222


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f} images/s"


def build_scans(images: np.ndarray, root: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        side = int(rng.integers(100, 401))
        big = np.asarray(
            Image.fromarray(images[i % len(images)]).resize((side, side), Image.Resampling.BICUBIC)
        )
        rgb = tint(big)
        path = root / f"{i:05d}{'.png' if i % 2 else '.jpg'}"
        Image.fromarray(rgb).save(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sample",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "data/sources/oracle-mnist-sample",
    )
    parser.add_argument("--scans", type=int, default=1000, help="number of scans to build and convert")
    args = parser.parse_args()

    images_name, labels_name = IDX_FILES["train"]
    sample, _ = read_idx_split(args.sample / images_name, args.sample / labels_name, 10)
    full = np.resize(sample, (FULL_DATASET, 28, 28))
    for size in (32, 64):
        start = time.perf_counter()
        convert_batch(full, size, workers())
        print(
            f"idx   28->{size:<3} convert_batch, {workers()} processes, {FULL_DATASET} images: {rate(FULL_DATASET, time.perf_counter() - start)}"
        )

    with tempfile.TemporaryDirectory() as tmp:
        paths = build_scans(sample, Path(tmp), args.scans)
        start = time.perf_counter()
        for path in paths[: args.scans // 4]:
            with Image.open(path) as img:
                convert(img, 28)
        one = time.perf_counter() - start
        print(f"scans 100-400 px ->28, 1 process, {args.scans // 4} scans: {rate(args.scans // 4, one)}")
        start = time.perf_counter()
        convert_scans(paths, 28, 16, 40_000_000)
        print(
            f"scans 100-400 px ->28, {workers()} processes, {args.scans} scans: {rate(args.scans, time.perf_counter() - start)}"
        )


if __name__ == "__main__":
    main()
