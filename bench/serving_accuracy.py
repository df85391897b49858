"""Accuracy of `oracle-mnist predict` on real test images written as files, plain and as scan-like renditions.

    python bench/serving_accuracy.py                 # models/model.pt, the sample's 400 test images
    python bench/serving_accuracy.py --backend onnx --model models/model.onnx

Each real test image (white glyph on black, 28x28) is written out in several renditions, then classified by
the installed console script exactly as a user would run it, and scored against its label:
plain (PNG as is), enlarged (5x, bicubic), dark-on-light (negated, enlarged 4x, JPEG), tinted (brown ink on
tan paper, enlarged 5x, RGB PNG), scan-frame (tinted, cut to the glyph's own non-square frame as the original
scans are, enlarged 6x), off-centre (the tinted glyph placed off-centre on a sheet of paper 1.7x its size).
The shared conversion has no contrast stretch and no cropping, so the tinted and off-centre renditions show
how far that carries.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from oracle_mnist.config import load_params
from oracle_mnist.datasets import IDX_FILES, read_idx_split

# The renditions are the tests' own (tests/helpers.py), so the figures this prints and the tests' thresholds
# speak of the same images; tests/ is not a package, so it goes on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import PAPER, enlarge, own_frame, tint


def scan_frame(glyph: np.ndarray) -> np.ndarray:
    return tint(enlarge(own_frame(glyph), 6))


def off_centre(glyph: np.ndarray) -> np.ndarray:
    sheet = np.empty((200, 240, 3), dtype=np.uint8)
    sheet[:] = PAPER.astype(np.uint8)
    big = tint(enlarge(glyph, 5))
    sheet[10 : 10 + 140, 85 : 85 + 140] = big
    return sheet


RENDITIONS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "plain": ("png", lambda g: g),
    "enlarged": ("png", lambda g: enlarge(g, 5)),
    "dark-on-light": ("jpg", lambda g: 255 - enlarge(g, 4)),
    "tinted": ("png", lambda g: tint(enlarge(g, 5))),
    "scan-frame": ("png", scan_frame),
    "off-centre": ("png", off_centre),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"))
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    parser.add_argument(
        "--sample", type=Path, default=None, help="idx folder (default: params.yaml data.source)"
    )
    args = parser.parse_args()
    params = load_params("params.yaml")
    sample = args.sample or Path(params.data.source)
    images_name, labels_name = IDX_FILES["test"]
    images, labels = read_idx_split(sample / images_name, sample / labels_name, params.num_classes)
    print(f"{args.model} ({args.backend}), {len(images)} real test images from {sample}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (ext, render) in RENDITIONS.items():
            paths = []
            for i, glyph in enumerate(images):
                path = Path(tmp) / f"{name}-{i:04d}.{ext}"
                Image.fromarray(render(glyph)).save(path)
                paths.append(str(path))
            proc = subprocess.run(
                [
                    "oracle-mnist",
                    "predict",
                    *paths,
                    "--model",
                    str(args.model),
                    "--backend",
                    args.backend,
                    "--json",
                ],
                capture_output=True,
                text=True,
                timeout=900,
                check=True,
            )
            predicted = np.array([row["index"] for row in json.loads(proc.stdout)])
            width, height = Image.open(paths[0]).size
            print(f"  {name:14s} {f'{width}x{height}':9s} accuracy {np.mean(predicted == labels):.4f}")


if __name__ == "__main__":
    main()
