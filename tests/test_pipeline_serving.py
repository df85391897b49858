"""End to end in a fresh copy: `dvc repro` trains (shrunken) and exports; the CLI and the API then serve the
pipeline's own models/model.pt and models/model.onnx from their default paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import dvc, serve_in_subprocess
from PIL import Image

from oracle_mnist.config import load_params

# dvc repro, then the CLI and uvicorn in subprocesses: the full suite's, not the edit loop's.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def glyph(tmp_path_factory: pytest.TempPathFactory, sample_test_images) -> Path:
    path = tmp_path_factory.mktemp("glyph") / "glyph.png"
    Image.fromarray(sample_test_images[0][0]).save(path)
    return path


def test_export_stage_runs_after_train_and_is_then_up_to_date(pipeline: Path):
    assert (pipeline / "models/model.onnx").stat().st_size > 1_000_000
    report = json.loads((pipeline / "metrics/export.json").read_text())
    assert report["images"] == 400
    assert report["max_abs_logit_diff"] <= 1e-4
    status = dvc(pipeline, "status", "export").stdout
    assert "up to date" in status


def test_cli_classifies_a_real_image_with_the_pipelines_models(pipeline: Path, glyph: Path):
    rows = {}
    for backend in ("torch", "onnx"):
        proc = subprocess.run(
            [sys.executable, "-m", "oracle_mnist.cli", "predict", str(glyph), "--json", "--backend", backend],
            cwd=pipeline,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        (rows[backend],) = json.loads(proc.stdout)
    assert rows["torch"]["index"] == rows["onnx"]["index"]
    assert abs(rows["torch"]["probability"] - rows["onnx"]["probability"]) < 1e-5


def test_api_serves_the_pipelines_model(pipeline: Path, glyph: Path):
    data = glyph.read_bytes()
    env = {"ORACLE_MNIST_MODEL": str(pipeline / "models/model.onnx"), "ORACLE_MNIST_BACKEND": "onnx"}
    with serve_in_subprocess(env) as url, httpx.Client(base_url=url, timeout=30) as http:
        info = http.get("/model").json()
        resp = http.post("/predict", files=[("files", ("glyph.png", data, "image/png"))])
    assert info["model_name"] == load_params(pipeline / "params.yaml").model
    assert info["data_hash"] and info["params_hash"]
    assert resp.status_code == 200
    assert resp.json()["predictions"][0]["name"] in info["class_names"]
