"""`oracle-mnist predict`: text and JSON output, both backends, and bad files named with exit status 1."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, broken_model_copy, encode
from PIL import Image

from oracle_mnist.cli import build_parser, display_name, main
from oracle_mnist.inference import Predictor


@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory, sample_test_images) -> list[Path]:
    """Real sample test images as files: a plain PNG, an enlarged dark-on-light JPEG, an RGBA PNG."""
    images, _ = sample_test_images
    root = tmp_path_factory.mktemp("images")
    plain = root / "plain.png"
    Image.fromarray(images[0]).save(plain)
    scan = root / "scan.jpg"
    Image.fromarray(255 - images[1]).resize((140, 140), Image.Resampling.BICUBIC).convert("RGB").save(scan)
    rgba = root / "cut-out.png"
    Image.fromarray(images[2]).convert("RGBA").save(rgba)
    return [plain, scan, rgba]


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_json_lists_every_image_with_its_top_k(capsys, model_file: Path, image_files: list[Path]):
    code, out, _ = run_main(
        capsys, "predict", *map(str, image_files), "--model", str(model_file), "--json", "--top-k", "3"
    )
    assert code == 0
    rows = json.loads(out)
    expected = Predictor.from_file(model_file).predict([Image.open(p) for p in image_files], top_k=3)
    assert [row["file"] for row in rows] == [str(p) for p in image_files]
    for row, pred in zip(rows, expected, strict=True):
        assert set(row) == {"file", "index", "name", "probability", "unsure", "unsure_reason", "top_k"}
        assert (row["unsure"], row["unsure_reason"]) == (False, None)  # real glyphs, no --min-confidence
        assert (row["index"], row["name"]) == (pred.index, pred.name)
        assert row["probability"] == pytest.approx(pred.probability)
        assert [t["index"] for t in row["top_k"]] == [i for i, _, _ in pred.top_k]
        assert len(row["top_k"]) == 3


def test_text_output_names_file_class_index_and_probability(
    capsys, model_file: Path, image_files: list[Path]
):
    code, out, _ = run_main(capsys, "predict", str(image_files[0]), "--model", str(model_file))
    (pred,) = Predictor.from_file(model_file).predict([Image.open(image_files[0])])
    assert code == 0
    assert out == f"{image_files[0]}: {pred.name} ({pred.index}) {pred.probability:.4f}\n"
    code, out, _ = run_main(
        capsys, "predict", str(image_files[0]), "--model", str(model_file), "--top-k", "2"
    )
    lines = out.splitlines()
    assert len(lines) == 3
    assert lines[1].startswith(f"  1. {pred.name} ({pred.index})")


def test_onnx_backend_gives_the_same_classes(
    capsys, calibrated_model_file: Path, onnx_model_file: Path, image_files
):
    files = list(map(str, image_files))
    _, by_torch, _ = run_main(
        capsys, "predict", *files, "--model", str(calibrated_model_file), "--json", "--top-k", "3"
    )
    code, by_onnx, _ = run_main(
        capsys,
        "predict",
        *files,
        "--model",
        str(onnx_model_file),
        "--backend",
        "onnx",
        "--json",
        "--top-k",
        "3",
    )
    assert code == 0
    for a, b in zip(json.loads(by_torch), json.loads(by_onnx), strict=True):
        assert [t["index"] for t in a["top_k"]] == [t["index"] for t in b["top_k"]]
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)


def test_bad_files_are_all_named_and_nothing_is_printed(
    capsys, tmp_path: Path, model_file: Path, image_files
):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.png"
    code, out, err = run_main(
        capsys,
        "predict",
        str(image_files[0]),
        str(text),
        str(empty),
        str(missing),
        "--model",
        str(model_file),
    )
    assert code == 1
    assert out == ""
    assert err.startswith("error: 3 of 4 file(s) not classified:")
    assert f"{text}: not an image file" in err
    assert f"{empty}: empty file" in err
    assert f"{missing}: no such file" in err


def test_too_many_pixels_is_refused(capsys, tmp_path: Path, model_file: Path):
    big = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(big)
    code, _, err = run_main(capsys, "predict", str(big), "--model", str(model_file), "--max-pixels", "50000")
    assert code == 1
    assert f"{big}: 300x300 = 90000 pixels is over the limit of 50000" in err


def test_missing_model_and_bad_top_k_are_errors(
    capsys, monkeypatch, tmp_path: Path, model_file: Path, image_files
):
    monkeypatch.chdir(REPO)  # in a clone: dvc makes the model
    code, _, err = run_main(capsys, "predict", str(image_files[0]), "--model", str(tmp_path / "none.pt"))
    assert (code, err.strip()) == (
        1,
        f"error: {tmp_path / 'none.pt'}: model file not found (run `dvc repro train` or `dvc pull`)",
    )
    for value in ("11", "20", "0"):
        code, _, err = run_main(
            capsys, "predict", str(image_files[0]), "--model", str(model_file), "--top-k", value
        )
        assert (code, err.strip()) == (1, f"error: --top-k: must be between 1 and 10, got {value}")


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_outside_a_clone_a_missing_model_asks_for_model_not_dvc(
    capsys, monkeypatch, tmp_path: Path, image_files, backend
):
    monkeypatch.chdir(tmp_path)  # no dvc.yaml here: `dvc repro` would fail
    code, out, err = run_main(capsys, "predict", str(image_files[0]), "--backend", backend)
    default = "models/model.pt" if backend == "torch" else "models/model.onnx"
    assert (code, out) == (1, "")
    assert err.startswith(f"error: {default}: model file not found (pass --model PATH: ")
    assert "dvc repro" not in err.split("from a clone")[0]
    code, _, err = run_main(capsys, "predict", str(image_files[0]), "--model", "elsewhere/m.pt")
    assert (code, err.strip()) == (
        1,
        "error: elsewhere/m.pt: model file not found (check the path given to --model)",
    )


def test_version_is_the_installed_packages(capsys):
    code, out, _ = run_main(capsys, "--version")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert (code, out) == (0, f"oracle-mnist {importlib.metadata.version('oracle-mnist')}\n")
    assert importlib.metadata.version("oracle-mnist") == pyproject["project"]["version"]


def test_a_model_whose_temperature_overflows_is_refused_not_served_as_nan(
    capsys, tmp_path: Path, model_file: Path, image_files
):
    broken = broken_model_copy(model_file, tmp_path / "cold.pt", temperature=5e-324)
    code, out, err = run_main(capsys, "predict", str(image_files[0]), "--model", str(broken), "--json")
    assert (code, out) == (1, "")
    assert err.startswith(f"error: {broken}: model metadata: temperature: expected a number from 0.05 to 20")


def test_blank_and_tiny_images_are_flagged_unsure(capsys, tmp_path: Path, model_file: Path, image_files):
    blank = tmp_path / "blank.png"
    blank.write_bytes(encode(Image.new("L", (120, 80), 255)))
    dot = tmp_path / "dot.png"
    dot.write_bytes(encode(Image.new("L", (1, 1), 0)))
    files = [str(image_files[0]), str(blank), str(dot)]
    code, out, _ = run_main(capsys, "predict", *files, "--model", str(model_file), "--json")
    assert code == 0
    rows = json.loads(out)
    assert [(r["unsure"], r["unsure_reason"]) for r in rows] == [
        (False, None),
        (True, "no_ink"),
        (True, "too_small"),
    ]
    code, out, _ = run_main(capsys, "predict", *files, "--model", str(model_file))
    lines = out.splitlines()
    assert not lines[0].endswith("unsure")
    assert lines[1].startswith(f"{blank}: ") and lines[1].endswith(" unsure (no ink: blank or uniform image)")
    assert lines[2].startswith(f"{dot}: ") and lines[2].endswith(" unsure (too small to hold a character)")


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["predict"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["predict", "a.png", "--backend", "tf"])
    assert exc.value.code == 2
    assert "invalid choice: 'tf'" in capsys.readouterr().err


@pytest.mark.slow
def test_installed_console_script(model_file: Path, image_files: list[Path]):
    script = Path(sys.executable).with_name("oracle-mnist")
    cmd = [str(script)] if script.is_file() else ["oracle-mnist"]
    proc = subprocess.run(
        [*cmd, "predict", str(image_files[1]), "--model", str(model_file), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    (pred,) = Predictor.from_file(model_file).predict([Image.open(image_files[1])])
    assert (row["file"], row["index"]) == (str(image_files[1]), pred.index)
    assert np.isclose(row["probability"], pred.probability)


# --- one command ----------------------------------------------------------------------------------------------


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: oracle-mnist [-h] [--version] COMMAND")
    assert "predict" in out and "report" in out


def test_report_subcommand_calls_the_report(capsys, monkeypatch, tmp_path: Path):
    import oracle_mnist.report

    calls = []

    def write_report(repo, base, head, out, image_url_prefix=""):
        calls.append((repo, base, head, out, image_url_prefix))
        return out / "report.md"

    monkeypatch.setattr(oracle_mnist.report, "write_report", write_report)
    code, out, _ = run_main(capsys, "report", "main", "-o", str(tmp_path / "r"), "--repo", str(tmp_path))
    assert code == 0
    assert calls == [(tmp_path, "main", None, tmp_path / "r", "")]
    assert out == f"{tmp_path / 'r' / 'report.md'}\n"


# --- hostile file names and files -----------------------------------------------------------------------------


def test_display_name_escapes_what_cannot_be_printed():
    assert display_name("glyph 日.png") == "glyph 日.png"
    assert display_name("two\nlines.png") == "two\\nlines.png"
    assert display_name(os.fsdecode(b"bad\xff.png")) == "bad\\xff.png"
    assert display_name("bell\x07 and \\.png") == "bell\\x07 and \\\\.png"


@pytest.mark.slow
def test_any_file_name_is_written_safely_with_strict_utf8_output(tmp_path: Path, model_file, image_files):
    odd = [tmp_path / os.fsdecode(b"bad\xff.png"), tmp_path / "two\nlines.png", tmp_path / "日.png"]
    for path in odd:
        shutil.copy(image_files[0], path)
    cmd = [sys.executable, "-m", "oracle_mnist.cli", "predict", *map(str, odd), "--model", str(model_file)]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    text = subprocess.run(cmd, capture_output=True, env=env, timeout=120)
    as_json = subprocess.run([*cmd, "--json"], capture_output=True, env=env, timeout=120)
    assert (text.returncode, as_json.returncode) == (0, 0), (text.stderr, as_json.stderr)
    lines = text.stdout.decode("utf-8").splitlines()
    assert len(lines) == 3  # one per file: the newline in a name is escaped
    assert lines[0].startswith(f"{tmp_path}/bad\\xff.png: ")
    assert lines[1].startswith(f"{tmp_path}/two\\nlines.png: ")
    assert lines[2].startswith(f"{tmp_path}/日.png: ")
    rows = json.loads(as_json.stdout.decode("utf-8"))
    assert [row["file"] for row in rows] == [f"{tmp_path}/bad\\xff.png", str(odd[1]), str(odd[2])]


def test_non_regular_and_oversized_files_are_refused_before_reading(capsys, tmp_path: Path, model_file):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    big = tmp_path / "big.png"
    with open(big, "wb") as fh:
        fh.truncate(10**9)
    code, out, err = run_main(
        capsys, "predict", str(fifo), "/dev/zero", str(tmp_path), str(big), "--model", str(model_file),
        "--max-file-bytes", "1000",
    )  # fmt: skip
    assert (code, out) == (1, "")
    assert f"{fifo}: is a FIFO, not a regular file" in err
    assert "/dev/zero: is a device or special file, not a regular file" in err
    assert f"{tmp_path}: is a directory" in err
    assert f"{big}: file is larger than the limit of 1000 bytes" in err


def test_a_broken_model_exits_1_and_prints_no_probability(capsys, tmp_path: Path, model_file, image_files):
    broken = broken_model_copy(model_file, tmp_path / "nan.pt", float("nan"))
    code, out, err = run_main(capsys, "predict", str(image_files[0]), "--model", str(broken), "--json")
    assert (code, out) == (1, "")
    assert err.startswith(f"error: {broken}: weights are not finite")


def softmax_rows(logits: np.ndarray, temperature: float) -> np.ndarray:
    scaled = logits.astype(np.float64) / temperature
    exp = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def test_probabilities_are_calibrated_by_the_model_temperature(
    capsys, model_file: Path, calibrated_model_file: Path, image_files: list[Path]
):
    plain = Predictor.from_file(model_file)
    logits = plain.logits(plain.preprocess([Image.open(p) for p in image_files]))
    args = ("predict", *map(str, image_files), "--json", "--top-k", "10")
    rows = {}
    for backend_file, temperature in ((model_file, 1.0), (calibrated_model_file, 2.0)):
        code, out, _ = run_main(capsys, *args, "--model", str(backend_file))
        assert code == 0
        rows[temperature] = json.loads(out)
        for row, want in zip(rows[temperature], softmax_rows(logits, temperature), strict=True):
            got = np.zeros(10)
            got[[t["index"] for t in row["top_k"]]] = [t["probability"] for t in row["top_k"]]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
            assert row["probability"] == pytest.approx(want.max())
    # One scalar: the class is the same, only how sure the model says it is changes.
    assert [r["index"] for r in rows[1.0]] == [r["index"] for r in rows[2.0]]
    assert [r["probability"] for r in rows[1.0]] != [r["probability"] for r in rows[2.0]]


def test_min_confidence_flags_answers_below_it_unsure(capsys, model_file: Path, image_files: list[Path]):
    args = ("predict", *map(str, image_files), "--model", str(model_file))
    code, out, _ = run_main(capsys, *args, "--json")
    probabilities = sorted(row["probability"] for row in json.loads(out))
    # A minimum between the images' probabilities: those below it are unsure, the others not.
    minimum = (probabilities[0] + probabilities[-1]) / 2
    code, out, _ = run_main(capsys, *args, "--json", "--min-confidence", str(minimum))
    rows = json.loads(out)
    assert code == 0
    assert [r["unsure"] for r in rows] == [r["probability"] < minimum for r in rows]
    assert any(r["unsure"] for r in rows) and not all(r["unsure"] for r in rows)
    code, out, _ = run_main(capsys, *args, "--min-confidence", str(minimum))
    lines = out.splitlines()
    assert [line.endswith(" unsure") for line in lines] == [r["unsure"] for r in rows]


@pytest.mark.parametrize("value", ["-0.1", "1", "1.5", "nan", "inf"])
def test_min_confidence_outside_0_to_1_is_an_error(capsys, model_file: Path, image_files, value):
    code, out, err = run_main(
        capsys, "predict", str(image_files[0]), "--model", str(model_file), "--min-confidence", value
    )
    assert (code, out) == (1, "")
    assert err.startswith("error: --min-confidence: expected a number from 0 (off) up to but not including 1")
    assert err.count("\n") == 1
