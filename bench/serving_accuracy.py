"""Accuracy of `oracle-mnist predict` on real test images written as files, plain and as scan-like renditions.

    python bench/serving_accuracy.py                 # models/model.pt, the sample's 400 test images
    python bench/serving_accuracy.py --backend onnx --model models/model.onnx

Each real test image (white glyph on black, 28x28) is written out as a PNG as is (plain), and as each of the
tests' renditions (tests/helpers.py `renditions`): enlarged 5x as dark ink on five paper colours, with
noise, under uneven light, through JPEG at quality 60, off-centre on a large sheet, and small with wide
margins. Each set is classified by the installed console script exactly as a user would run it, scored
against its labels and printed beside the plain PNG accuracy (the target: every rendition within 2 points).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from oracle_mnist.config import load_params
from oracle_mnist.datasets import IDX_FILES, read_idx_split

# The renditions are the tests' own (tests/helpers.py), so the figures this prints and the tests' thresholds
# speak of the same images; tests/ is not a package, so it goes on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import renditions


def predict(paths: list[str], model: Path, backend: str) -> np.ndarray:
    cmd = ["oracle-mnist", "predict", *paths, "--model", str(model), "--backend", backend, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
    return np.array([row["index"] for row in json.loads(proc.stdout)])


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
        files: dict[str, list[str]] = {}
        for i, glyph in enumerate(images):
            for name, pixels in {"plain": glyph, **renditions(glyph)}.items():
                path = Path(tmp) / f"{name.replace(' ', '_').replace(',', '')}-{i:04d}.png"
                Image.fromarray(pixels).save(path)
                files.setdefault(name, []).append(str(path))
        plain = None
        for name, paths in files.items():
            accuracy = float(np.mean(predict(paths, args.model, args.backend) == labels))
            plain = accuracy if plain is None else plain
            width, height = Image.open(paths[0]).size
            print(
                f"  {name:24s} {f'{width}x{height}':9s} accuracy {accuracy:.4f}"
                f"  ({100 * (accuracy - plain):+.2f} points vs plain PNG)"
            )


if __name__ == "__main__":
    main()
