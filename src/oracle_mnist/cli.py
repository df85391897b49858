"""`oracle-mnist COMMAND`: the one user-facing command (`oracle-mnist --help` lists the subcommands).

predict  classify image files with a trained model
serve    run the HTTP API, with bounds on request heads and connections (server.py)
report   compare the results of two revisions as markdown with PNG plots (report.py)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from oracle_mnist.errors import OracleMnistError, exit_on_error
from oracle_mnist.inference import (
    BACKENDS,
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MODEL_PATHS,
    ModelNotFoundError,
    Prediction,
    Predictor,
    check_min_confidence,
    in_a_clone,
    read_image_file,
)

# Escapes for the usual control characters; any other unprintable one is written as \xNN, \uNNNN or \UNNNNNNNN.
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def display_name(path: Path | str) -> str:
    """A file name as one printable line: unchanged when it is printable, else escaped like a Python string
    literal (without quotes). Bytes that are not UTF-8 (decoded by Python as surrogates) become \\xNN."""
    text = str(path)
    if text.isprintable():
        return text
    out = []
    for char in text:
        code = ord(char)
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        elif 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        else:
            out.append(repr(char)[1:-1])
    return "".join(out)


def json_name(path: Path | str) -> str:
    """A file name for JSON: as it is when it is valid Unicode (JSON escapes control characters itself),
    escaped by `display_name` when it holds bytes that are not UTF-8 (lone surrogates are not valid JSON)."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return display_name(text)
    return text


def _add_predict(commands: argparse._SubParsersAction) -> None:
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
        "--min-confidence",
        type=float,
        default=0.0,
        metavar="P",
        help="flag an answer 'unsure' when its (calibrated) probability is below P, 0 <= P < 1 "
        "(default: 0, never)",
    )
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
        help="refuse images with more pixels than this, from the header (default: %(default)s)",
    )
    predict.add_argument(
        "--max-file-bytes",
        type=int,
        default=DEFAULT_MAX_FILE_BYTES,
        metavar="N",
        help="refuse files larger than this, reading no further (default: %(default)s)",
    )
    predict.set_defaults(run=run_predict)


def _add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the HTTP API",
        description="Serve the HTTP API (oracle_mnist.api:app) under uvicorn, with bounds on request heads "
        "(time and size) and on open connections that plain `uvicorn oracle_mnist.api:app` lacks. Settings "
        "come from the ORACLE_MNIST_* environment variables (docs/serving.md).",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    serve.set_defaults(run=run_serve)


def _add_report(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report",
        help="compare the results of two revisions (markdown and PNG plots)",
        description="Write a markdown report (metrics diff, params diff, plots as PNG) comparing two "
        "revisions, read through DVC; nothing is written if any step fails.",
    )
    report.add_argument("base", help="the revision to compare against, e.g. main or a commit")
    report.add_argument("head", nargs="?", help="the revision to report on (default: the workspace)")
    report.add_argument("-o", "--out", type=Path, default=Path("report"), help="output folder (replaced)")
    report.add_argument("--repo", type=Path, default=Path.cwd(), help="the DVC repository (default: here)")
    report.add_argument(
        "--image-url-prefix", default="", help="prefix for image links instead of the relative images/"
    )
    report.set_defaults(run=run_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oracle-mnist",
        description="Oracle-MNIST: classify oracle-bone character images, compare pipeline results.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_predict(commands)
    _add_serve(commands)
    _add_report(commands)
    return parser


def _version() -> str:
    """The installed package's version (pyproject.toml's, through the package metadata)."""
    try:
        return importlib.metadata.version("oracle-mnist")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


# What the text output adds after "unsure" when the image itself, not the model's confidence, is the doubt.
_REASONS = {"no_ink": " (no ink: blank or uniform image)", "too_small": " (too small to hold a character)"}


def format_text(path: Path | str, pred: Prediction) -> str:
    unsure = f" unsure{_REASONS.get(pred.unsure_reason or '', '')}" if pred.unsure else ""
    lines = [f"{display_name(path)}: {pred.name} ({pred.index}) {pred.probability:.4f}{unsure}"]
    if len(pred.top_k) > 1:
        lines += [
            f"  {rank}. {name} ({index}) {prob:.4f}" for rank, (index, name, prob) in enumerate(pred.top_k, 1)
        ]
    return "\n".join(lines)


def predict_files(
    predictor: Predictor,
    paths: Sequence[Path],
    top_k: int,
    max_pixels: int,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    min_confidence: float = 0.0,
) -> list[Prediction]:
    """Convert every file first (one image in memory at a time), then classify them in batches."""
    predictor.check_top_k(top_k, "--top-k")
    check_min_confidence(min_confidence, "--min-confidence")
    features, sizes, problems = [], [], []
    for path in tqdm(paths, desc="reading", unit="img", disable=len(paths) < 100, file=sys.stderr):
        name = display_name(path)
        try:
            img = read_image_file(path, max_pixels, max_bytes, name)
            features.append(predictor.features_of(img, name))
            sizes.append(img.size)
        except OracleMnistError as exc:
            problems.append(str(exc))
    if problems:
        raise OracleMnistError(
            f"{len(problems)} of {len(paths)} file(s) not classified:\n  " + "\n  ".join(problems)
        )
    return predictor.predict_features(np.stack(features), top_k, min_confidence, sizes)


def run_predict(args: argparse.Namespace) -> int:
    # Checked before the model loads: a mistyped option should not wait for it.
    check_min_confidence(args.min_confidence, "--min-confidence")
    try:
        predictor = Predictor.from_file(args.model, args.backend)
    except ModelNotFoundError as exc:
        if in_a_clone():
            raise  # its advice, `dvc repro` or `dvc pull`, works here
        hint = (
            "check the path given to --model"
            if args.model is not None
            else "pass --model PATH: a model.pt, or a model.onnx with --backend onnx, from a clone of the "
            "project after `dvc repro` or `dvc pull`"
        )
        raise OracleMnistError(f"{exc.path}: model file not found ({hint})") from None
    predictions = predict_files(
        predictor, args.images, args.top_k, args.max_pixels, args.max_file_bytes, args.min_confidence
    )
    pairs = list(zip(args.images, predictions, strict=True))
    if args.json:
        # ASCII: valid JSON whatever the output encoding.
        print(json.dumps([{"file": json_name(path), **pred.to_dict()} for path, pred in pairs], indent=2))
    else:
        print("\n".join(format_text(path, pred) for path, pred in pairs))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from oracle_mnist.server import serve

    serve(args.host, args.port)
    return 0


def run_report(args: argparse.Namespace) -> int:
    # Imported here: only `report` needs DVC and the plot renderer.
    from oracle_mnist.report import write_report

    print(display_name(write_report(args.repo, args.base, args.head, args.out, args.image_url_prefix)))
    return 0


@exit_on_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A character the output encoding lacks is escaped, never a UnicodeEncodeError after the work is done.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
