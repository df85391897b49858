"""`oracle-mnist predict IMAGE...`: classify image files with a trained model (see `--help`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from oracle_mnist.errors import OracleMnistError, exit_on_error
from oracle_mnist.inference import BACKENDS, DEFAULT_MODEL_PATHS, Prediction, Predictor, read_image_file

# Same ceiling as featurize.max_pixels' default: refuses decompression bombs before decoding.
DEFAULT_MAX_PIXELS = 40_000_000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oracle-mnist", description="Classify Oracle-MNIST oracle-bone character images."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    predict = commands.add_parser(
        "predict",
        help="classify image files",
        description=(
            "Classify images of any size, colour mode and format (dark ink on light ground or light on "
            "dark) with the conversion the model was trained with. If any file is not a readable image, "
            "nothing is classified: every bad file is named and the exit status is 1."
        ),
    )
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    predict.add_argument("--top-k", type=int, default=1, metavar="K", help="show the K most likely classes")
    predict.add_argument("--json", action="store_true", help="print a JSON list, one object per image")
    predict.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"saved model (default: {DEFAULT_MODEL_PATHS['torch']}, or {DEFAULT_MODEL_PATHS['onnx']} "
        "with --backend onnx)",
    )
    predict.add_argument("--backend", choices=BACKENDS, default="torch", help="inference backend")
    predict.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="refuse images with more pixels than this (default: %(default)s)",
    )
    return parser


def format_text(path: Path, pred: Prediction) -> str:
    lines = [f"{path}: {pred.name} ({pred.index}) {pred.probability:.4f}"]
    if len(pred.top_k) > 1:
        lines += [
            f"  {rank}. {name} ({index}) {prob:.4f}" for rank, (index, name, prob) in enumerate(pred.top_k, 1)
        ]
    return "\n".join(lines)


def predict_files(
    predictor: Predictor, paths: Sequence[Path], top_k: int, max_pixels: int
) -> list[Prediction]:
    """Convert every file first (one image in memory at a time), then classify them in batches."""
    predictor.check_top_k(top_k)
    features, problems = [], []
    for path in tqdm(paths, desc="reading", unit="img", disable=len(paths) < 100, file=sys.stderr):
        try:
            features.append(predictor.features_of(read_image_file(path, max_pixels), str(path)))
        except OracleMnistError as exc:
            problems.append(str(exc))
    if problems:
        raise OracleMnistError(
            f"{len(problems)} of {len(paths)} file(s) not classified:\n  " + "\n  ".join(problems)
        )
    return predictor.predict_features(np.stack(features), top_k)


@exit_on_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    predictor = Predictor.from_file(args.model, args.backend)
    predictions = predict_files(predictor, args.images, args.top_k, args.max_pixels)
    if args.json:
        rows = [
            {"file": str(path), **pred.to_dict()} for path, pred in zip(args.images, predictions, strict=True)
        ]
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        print("\n".join(format_text(path, pred) for path, pred in zip(args.images, predictions, strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
