"""The HTTP API, in-process (TestClient) and as a real `uvicorn oracle_mnist.api:app` on 127.0.0.1."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import (
    REPO,
    broken_model_copy,
    encode,
    free_port,
    png_header_only,
    serve_command,
    serve_in_subprocess,
    uvicorn_command,
)
from PIL import Image

from oracle_mnist.api import Settings, create_app
from oracle_mnist.errors import OracleMnistError
from oracle_mnist.inference import ModelMeta, Predictor


@pytest.fixture(scope="module")
def glyphs(sample_test_images) -> list[bytes]:
    return [encode(Image.fromarray(g)) for g in sample_test_images[0][:8]]


SMALL_LIMITS = {"max_files": 4, "max_file_bytes": 20_000, "max_pixels": 250_000}


def bad_requests(glyphs: list[bytes]) -> dict[str, tuple[list, int, str]]:
    """name -> (multipart files, expected status, text the error must contain), under SMALL_LIMITS."""
    return {
        "non-image": (
            [("files", ("notes.txt", b"hello, not an image", "text/plain"))],
            422,
            "notes.txt: not an image file",
        ),
        "truncated": (
            [("files", ("cut.png", glyphs[0][: len(glyphs[0]) // 2], "image/png"))],
            422,
            "cut.png: truncated or corrupt",
        ),
        "empty": ([("files", ("empty.png", b"", "image/png"))], 422, "empty.png: empty file"),
        "too-many-files": (
            [("files", (f"g{i}.png", glyphs[0], "image/png")) for i in range(5)],
            413,
            "5 files sent; the limit is 4",
        ),
        "too-large-file": (
            [("files", ("noise.bmp", encode(Image.effect_noise((150, 150), 60)), "image/png"))],
            413,
            "noise.bmp: file is larger than the limit of 20000 bytes",
        ),
        "too-many-pixels": (
            [("files", ("wide.png", encode(Image.new("L", (1000, 300))), "image/png"))],
            413,
            "wide.png: 1000x300 = 300000 pixels is over the limit of 250000",
        ),
        "bomb-header": (
            [("files", ("bomb.png", png_header_only(60_000, 60_000), "image/png"))],
            413,
            "bomb.png:",
        ),
        "one-bad-among-good": (
            [("files", ("ok.png", glyphs[0], "image/png")), ("files", ("bad.gif", b"GIF89a", "image/gif"))],
            422,
            "bad.gif",
        ),
    }


# --- in-process -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(model_file: Path) -> TestClient:
    with TestClient(create_app(Settings(model_path=model_file, **SMALL_LIMITS))) as c:
        yield c


def test_health_and_model_info(client: TestClient, model_file: Path):
    assert client.get("/health").json() == {"status": "ok", "model": "resnet18", "backend": "torch"}
    info = client.get("/model").json()
    meta = Predictor.from_file(model_file).meta
    assert info["model_name"] == "resnet18"
    assert info["class_names"] == list(meta.class_names)
    assert (info["data_hash"], info["metrics"], info["image_size"]) == (
        "test-data-hash",
        {"val_accuracy": 0.5},
        28,
    )
    assert info["limits"] == SMALL_LIMITS


def test_docs_and_openapi(client: TestClient):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/health", "/model"} <= set(spec["paths"])
    assert {"413", "422"} <= set(spec["paths"]["/predict"]["post"]["responses"])


def test_predict_classifies_a_batch_like_the_predictor(client: TestClient, model_file: Path, glyphs):
    files = [("files", (f"g{i}.png", data, "image/png")) for i, data in enumerate(glyphs[:3])]
    resp = client.post("/predict", files=files, params={"top_k": 2})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    expected = Predictor.from_file(model_file).predict(
        [Image.open(io.BytesIO(d)) for d in glyphs[:3]], top_k=2
    )
    assert (body["model"], body["backend"]) == ("resnet18", "torch")
    assert [p["file"] for p in body["predictions"]] == ["g0.png", "g1.png", "g2.png"]
    for got, want in zip(body["predictions"], expected, strict=True):
        assert (got["index"], got["name"]) == (want.index, want.name)
        assert got["probability"] == pytest.approx(want.probability)
        assert [t["index"] for t in got["top_k"]] == [i for i, _, _ in want.top_k]
    default_k = client.post("/predict", files=files[:1]).json()["predictions"][0]["top_k"]
    assert len(default_k) == 3


@pytest.mark.parametrize(
    "case",
    [
        "non-image",
        "truncated",
        "empty",
        "too-many-files",
        "too-large-file",
        "too-many-pixels",
        "bomb-header",
        "one-bad-among-good",
    ],
)
def test_bad_uploads_get_a_4xx_naming_the_problem(client: TestClient, glyphs, case):
    files, status, text = bad_requests(glyphs)[case]
    resp = client.post("/predict", files=files)
    assert resp.status_code == status, resp.text
    assert text in resp.json()["detail"]


def test_bad_fields_get_a_4xx(client: TestClient, glyphs):
    resp = client.post("/predict", data={"other": "x"})
    assert resp.status_code == 422
    assert resp.json()["detail"].startswith("files: Field required")
    resp = client.post("/predict", data={"files": "not a file"}, files=[("x", ("a", b"1"))])
    assert resp.status_code == 422
    resp = client.post("/predict", files=[("files", ("g.png", glyphs[0], "image/png"))], params={"top_k": 11})
    assert (resp.status_code, resp.json()["detail"]) == (422, "top_k: must be between 1 and 10, got 11")
    resp = client.post("/predict", files=[("files", ("g.png", glyphs[0], "image/png"))], params={"top_k": 0})
    assert resp.status_code == 422
    resp = client.post(
        "/predict", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert 400 <= resp.status_code < 500


def test_settings_from_the_environment():
    env = {"ORACLE_MNIST_BACKEND": "onnx", "ORACLE_MNIST_MAX_FILES": "3", "ORACLE_MNIST_THREADS": "2"}
    settings = Settings.from_env(env)
    assert (settings.model_path, settings.backend, settings.max_files) == (
        Path("models/model.onnx"),
        "onnx",
        3,
    )
    assert (settings.threads, Settings.from_env({}).threads) == (2, 1)
    assert Settings.from_env({}).model_path == Path("models/model.pt")
    with pytest.raises(
        OracleMnistError, match="ORACLE_MNIST_MAX_PIXELS: expected a positive integer, got '-5'"
    ):
        Settings.from_env({"ORACLE_MNIST_MAX_PIXELS": "-5"})
    with pytest.raises(OracleMnistError, match="ORACLE_MNIST_BACKEND: 'tf' is not one of"):
        Settings.from_env({"ORACLE_MNIST_BACKEND": "tf"})


def test_app_refuses_to_start_without_its_model(tmp_path: Path):
    app = create_app(Settings(model_path=tmp_path / "absent.pt"))
    with (
        pytest.raises(OracleMnistError, match=f"{tmp_path / 'absent.pt'}: model file not found"),
        TestClient(app),
    ):
        pass


def test_outside_a_clone_a_missing_model_asks_for_the_setting_not_dvc(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no dvc.yaml here: `dvc repro` would fail
    app = create_app(Settings.from_env({}))
    with (
        pytest.raises(OracleMnistError) as exc,
        TestClient(app),
    ):
        pass
    assert str(exc.value) == (
        "models/model.pt: model file not found (set ORACLE_MNIST_MODEL to a saved model: a model.pt, or a "
        "model.onnx with ORACLE_MNIST_BACKEND=onnx)"
    )


def test_a_model_whose_temperature_overflows_never_starts(tmp_path: Path, model_file: Path):
    broken = broken_model_copy(model_file, tmp_path / "cold.pt", temperature=5e-324)
    message = f"^{broken}: model metadata: temperature: expected a number from 0.05 to 20 .*got 5e-324$"
    with pytest.raises(OracleMnistError, match=message), TestClient(create_app(Settings(model_path=broken))):
        pass


# --- a real server --------------------------------------------------------------------------------------


def server_env(model: Path, backend: str) -> dict[str, str]:
    return {
        "ORACLE_MNIST_MODEL": str(model),
        "ORACLE_MNIST_BACKEND": backend,
        **{f"ORACLE_MNIST_{k.upper()}": str(v) for k, v in SMALL_LIMITS.items()},
    }


@pytest.fixture(scope="module")
def server(model_file: Path) -> str:
    with serve_in_subprocess(server_env(model_file, "torch")) as url:
        yield url


@pytest.mark.slow
def test_real_server_classifies_and_refuses_every_bad_input(server: str, model_file: Path, glyphs):
    assert urlparse(server).hostname == "127.0.0.1"
    with httpx.Client(base_url=server, timeout=30) as http:
        assert http.get("/health").json()["status"] == "ok"
        resp = http.post(
            "/predict", files=[("files", (f"g{i}.png", d, "image/png")) for i, d in enumerate(glyphs[:4])]
        )
        assert resp.status_code == 200
        expected = Predictor.from_file(model_file).predict([Image.open(io.BytesIO(d)) for d in glyphs[:4]])
        assert [p["index"] for p in resp.json()["predictions"]] == [p.index for p in expected]
        for case, (files, status, text) in bad_requests(glyphs).items():
            resp = http.post("/predict", files=files)
            assert resp.status_code == status, case
            assert text in resp.json()["detail"], case


def raw_request(url: str, head: bytes) -> bytes:
    """Send `head` (request line and headers, no body) over a plain socket; return the whole response."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < content_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def content_length(response: bytes) -> int:
    for line in response.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@pytest.mark.slow
def test_real_server_refuses_oversized_and_unsized_bodies_before_reading(server: str):
    huge = raw_request(
        server,
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 900000000\r\n\r\n",
    )
    assert huge.startswith(b"HTTP/1.1 413")
    assert b"request body of 900000000 bytes is over the limit" in huge
    chunked = raw_request(
        server,
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
    )
    assert chunked.startswith(b"HTTP/1.1 411")


@pytest.mark.slow
def test_real_server_gives_no_5xx_to_8_concurrent_clients(server: str, glyphs):
    requests = [([("files", ("g.png", glyphs[i % len(glyphs)], "image/png"))], 200) for i in range(24)]
    requests += [(files, status) for files, status, _ in bad_requests(glyphs).values()] * 3

    def send(item: tuple[list, int]) -> tuple[int, int]:
        files, status = item
        with httpx.Client(base_url=server, timeout=60) as http:
            return http.post("/predict", files=files).status_code, status

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, requests))
    assert [got for got, want in results if got != want] == []


@pytest.mark.slow
def test_real_server_serves_the_onnx_backend(calibrated_model_file: Path, onnx_model_file: Path, glyphs):
    with (
        serve_in_subprocess(server_env(onnx_model_file, "onnx")) as url,
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        assert http.get("/health").json() == {"status": "ok", "model": "resnet18", "backend": "onnx"}
        resp = http.post(
            "/predict", files=[("files", (f"g{i}.png", d, "image/png")) for i, d in enumerate(glyphs[:4])]
        )
    expected = Predictor.from_file(calibrated_model_file).predict(
        [Image.open(io.BytesIO(d)) for d in glyphs[:4]]
    )
    assert [p["index"] for p in resp.json()["predictions"]] == [p.index for p in expected]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ({}, "model file not found"),
        ({"weight": float("nan")}, "weights are not finite (NaN or infinity) in 1 tensor(s): conv1.weight"),
        ({"std": float("nan")}, "model metadata: std: expected a finite number, got nan"),
        ({"std": 0.0}, "model metadata: std: must be positive, got 0.0"),
    ],
)
def test_uvicorn_refuses_to_start_without_a_usable_model(tmp_path: Path, model_file: Path, broken, message):
    path = tmp_path / "model.pt"
    if broken:
        broken_model_copy(model_file, path, **broken)
    env = {**os.environ, "ORACLE_MNIST_MODEL": str(path)}
    proc = subprocess.run(uvicorn_command(free_port()), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3  # uvicorn's status for a failed start-up
    assert f"oracle-mnist API cannot start: {path}: {message}" in proc.stderr


@pytest.mark.slow
def test_real_server_closes_a_connection_whose_body_never_arrives(model_file: Path):
    env = {**server_env(model_file, "torch"), "ORACLE_MNIST_BODY_TIMEOUT": "1"}
    with serve_in_subprocess(env) as url:
        parsed = urlparse(url)
        with socket.create_connection((parsed.hostname, parsed.port), timeout=30) as sock:
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 100000\r\n\r\n"
            )
            data = b""
            while chunk := sock.recv(65536):  # until the server closes the connection
                data += chunk
    assert data.startswith(b"HTTP/1.1 408")
    assert b"request body did not arrive within 1 s" in data


def test_model_info_is_every_model_meta_field_and_the_serving_settings(client: TestClient, model_file: Path):
    meta = Predictor.from_file(model_file).meta
    info = client.get("/model").json()
    serving = {"characters", "backend", "limits", "min_confidence"}
    assert set(info) == {f.name for f in fields(ModelMeta)} | serving
    assert {name: info[name] for name in ("mean", "std", "epoch")} == {
        "mean": meta.mean,
        "std": meta.std,
        "epoch": meta.epoch,
    }


def test_a_model_that_outputs_nan_gets_a_500_never_a_null(
    client: TestClient, model_file: Path, glyphs, monkeypatch, caplog
):
    predictor = client.app.state.predictor
    monkeypatch.setattr(predictor, "_run", lambda batch: np.full((len(batch), 10), np.nan, np.float32))
    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        resp = client.post("/predict", files=[("files", ("g.png", glyphs[0], "image/png"))])
    assert resp.status_code == 500
    # The client learns what failed, not where the server keeps its model; the server's log has both.
    assert resp.json() == {"detail": "the model failed on this request: its outputs were not finite"}
    assert f"{model_file}: the model's outputs are not finite" in caplog.text


@pytest.mark.parametrize("max_files", [SMALL_LIMITS["max_files"], 9])
def test_openapi_states_the_bounds_on_files_that_the_server_enforces(model_file: Path, glyphs, max_files):
    limits = {**SMALL_LIMITS, "max_files": max_files}
    with TestClient(create_app(Settings(model_path=model_file, **limits))) as c:
        spec = c.get("/openapi.json").json()
        body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        files = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]["properties"]["files"]
        assert (files["minItems"], files["maxItems"]) == (1, max_files)
        # The bounds are the ones enforced: one file over the maximum is refused, the maximum is not.
        over = [("files", (f"g{i}.png", glyphs[0], "image/png")) for i in range(max_files + 1)]
        assert c.post("/predict", files=over).status_code == 413
        assert c.post("/predict", files=over[:max_files]).status_code == 200
        assert c.post("/predict", data={"top_k": "1"}).status_code == 422


def test_blank_and_tiny_uploads_are_flagged_unsure_with_the_reason(client: TestClient, glyphs):
    files = [
        ("files", ("glyph.png", glyphs[0], "image/png")),
        ("files", ("blank.png", encode(Image.new("RGB", (200, 150), (240, 230, 210))), "image/png")),
        ("files", ("dot.png", encode(Image.new("L", (1, 1), 0)), "image/png")),
    ]
    resp = client.post("/predict", files=files)
    assert resp.status_code == 200, resp.text
    got = [(p["file"], p["unsure"], p["unsure_reason"]) for p in resp.json()["predictions"]]
    assert got == [("glyph.png", False, None), ("blank.png", True, "no_ink"), ("dot.png", True, "too_small")]
    schema = client.get("/openapi.json").json()["components"]["schemas"]["ImagePrediction"]
    assert "unsure_reason" in schema["required"]
    reason = schema["properties"]["unsure_reason"]
    assert {v for option in reason["anyOf"] for v in option.get("enum", [])} == {
        "low_confidence",
        "no_ink",
        "too_small",
    }
    assert "no_ink" in reason["description"] and "too_small" in reason["description"]


def test_formats_outside_the_served_list_are_refused(client: TestClient, sample_test_images):
    buf = io.BytesIO()
    Image.fromarray(sample_test_images[0][0]).save(buf, "PCX")  # Pillow reads it; the API does not serve it
    resp = client.post("/predict", files=[("files", ("glyph.pcx", buf.getvalue(), "image/x-pcx"))])
    assert resp.status_code == 422
    assert resp.json()["detail"].startswith(
        "glyph.pcx: not an image file Pillow can read (accepted: PNG, JPEG"
    )


def test_mutated_images_never_get_a_5xx(client: TestClient, sample_test_images):
    """Valid files of every served format with random bytes overwritten or cut: each answer is 200 or 4xx."""
    rng = np.random.default_rng(0)
    glyph = Image.fromarray(sample_test_images[0][5]).resize((64, 64))
    originals = []
    for fmt, mode in [
        ("PNG", "L"),
        ("JPEG", "RGB"),
        ("GIF", "P"),
        ("BMP", "RGB"),
        ("TIFF", "I;16"),
        ("WEBP", "RGB"),
        ("PPM", "L"),
    ]:
        buf = io.BytesIO()
        glyph.convert(mode).save(buf, fmt)
        originals.append((fmt, buf.getvalue()))
    statuses = Counter()
    for i in range(140):
        fmt, data = originals[i % len(originals)]
        mutated = bytearray(data)
        for pos in rng.integers(0, len(mutated), size=int(rng.integers(1, 8))):
            mutated[pos] = int(rng.integers(0, 256))
        if i % 3 == 0:
            mutated = mutated[: int(rng.integers(8, len(mutated)))]
        resp = client.post("/predict", files=[("files", (f"m{i}.{fmt.lower()}", bytes(mutated), "image/*"))])
        statuses[resp.status_code] += 1
        assert resp.status_code == 200 or (
            resp.status_code in (413, 422) and f"m{i}." in resp.json()["detail"]
        ), (
            fmt,
            resp.status_code,
            resp.text,
        )
    assert statuses[200] > 0 and statuses[422] > 0  # both outcomes occur: the mutations do bite


# --- calibrated probabilities and the minimum confidence -------------------------------------------------


def glyph_files(glyphs: list[bytes], n: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"g{i}.png", data, "image/png")) for i, data in enumerate(glyphs[:n])]


def test_probabilities_are_calibrated_by_the_model_temperature(
    model_file: Path, calibrated_model_file: Path, glyphs
):
    plain = Predictor.from_file(model_file)
    logits = plain.logits(plain.preprocess([Image.open(io.BytesIO(d)) for d in glyphs[:4]])).astype(
        np.float64
    )
    scaled = logits / 2.0
    want = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    with TestClient(create_app(Settings(model_path=calibrated_model_file, **SMALL_LIMITS))) as c:
        assert c.get("/model").json()["temperature"] == 2.0
        body = c.post("/predict", files=glyph_files(glyphs, 4), params={"top_k": 10}).json()
    for pred, row in zip(body["predictions"], want, strict=True):
        got = np.zeros(10)
        got[[t["index"] for t in pred["top_k"]]] = [t["probability"] for t in pred["top_k"]]
        np.testing.assert_allclose(got, row, rtol=1e-5, atol=1e-7)
        assert (pred["index"], pred["probability"]) == (int(row.argmax()), pytest.approx(row.max()))


def test_min_confidence_flags_unsure_answers_from_the_query_or_the_setting(model_file: Path, glyphs):
    files = glyph_files(glyphs, 4)
    with TestClient(create_app(Settings(model_path=model_file, **SMALL_LIMITS))) as c:
        plain = c.post("/predict", files=files).json()["predictions"]
        assert c.get("/model").json()["min_confidence"] == 0.0
    assert [p["unsure"] for p in plain] == [False] * 4  # off by default
    probabilities = sorted(p["probability"] for p in plain)
    minimum = (probabilities[0] + probabilities[-1]) / 2
    with TestClient(create_app(Settings(model_path=model_file, min_confidence=minimum, **SMALL_LIMITS))) as c:
        assert c.get("/model").json()["min_confidence"] == minimum
        by_setting = c.post("/predict", files=files).json()["predictions"]
        by_query = c.post("/predict", files=files, params={"min_confidence": 0}).json()["predictions"]
    assert [p["unsure"] for p in by_setting] == [p["probability"] < minimum for p in plain]
    assert any(p["unsure"] for p in by_setting) and not all(p["unsure"] for p in by_setting)
    assert [p["probability"] for p in by_setting] == [p["probability"] for p in plain]
    assert not any(p["unsure"] for p in by_query)  # the query overrides the server's minimum


@pytest.mark.parametrize("value", ["-0.5", "1", "2", "nan"])
def test_min_confidence_outside_0_to_1_gets_a_422(client: TestClient, glyphs, value):
    resp = client.post("/predict", files=glyph_files(glyphs, 1), params={"min_confidence": value})
    assert resp.status_code == 422
    assert resp.json()["detail"].startswith(
        "min_confidence: expected a number from 0 (off) up to but not including 1, got "
    )
    resp = client.post("/predict", files=glyph_files(glyphs, 1), params={"min_confidence": "high"})
    assert resp.status_code == 422 and resp.json()["detail"].startswith("min_confidence: ")


def test_min_confidence_setting_from_the_environment_is_checked(model_file: Path):
    assert Settings.from_env({"ORACLE_MNIST_MIN_CONFIDENCE": "0.6"}).min_confidence == 0.6
    assert Settings.from_env({}).min_confidence == 0.0
    for raw in ("1", "-0.1", "nan", "high", ""):
        with pytest.raises(OracleMnistError, match=r"^ORACLE_MNIST_MIN_CONFIDENCE: expected a number from 0"):
            Settings.from_env({"ORACLE_MNIST_MIN_CONFIDENCE": raw})
    app = create_app(Settings(model_path=model_file, min_confidence=1.0))
    with pytest.raises(OracleMnistError, match="min_confidence: expected a number"), TestClient(app):
        pass


# --- the server's bounds on request heads and connections (`oracle-mnist serve`, oracle_mnist.server) --------


def serve_argv(port: int) -> list[str]:
    """`oracle-mnist serve` on 127.0.0.1:`port`, through the console script's module."""
    return [sys.executable, "-m", "oracle_mnist.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]


def image_argv(port: int) -> list[str]:
    """The API image's CMD (dockerfiles/api.Dockerfile) with its host and port moved to 127.0.0.1:`port`."""
    text = (REPO / "dockerfiles/api.Dockerfile").read_text(encoding="utf-8")
    cmd = json.loads(re.findall(r"^CMD (\[.*\])$", text, re.MULTILINE)[-1])
    assert cmd[0] == "uvicorn" and "0.0.0.0" in cmd and "8000" in cmd
    moved = {"0.0.0.0": "127.0.0.1", "8000": str(port)}
    return [sys.executable, "-m", "uvicorn", *(moved.get(arg, arg) for arg in cmd[1:])]


def with_open_file_limit(argv: list[str], limit: int) -> list[str]:
    """`argv` run with its open-file limit lowered to `limit`, so a test can exceed it with a few hundred
    connections instead of tens of thousands."""
    code = f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit})); "
    return [sys.executable, "-c", code + "os.execv(sys.argv[1], sys.argv[1:])", *argv]


@contextlib.contextmanager
def serving(argv: Callable[[int], list[str]], env: dict[str, str]) -> Iterator[str]:
    """The server `argv(port)` starts, on a free port, until the block ends; yields its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serve_command(argv(port), f"{url}/health", env):
        yield url


def address(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname, parsed.port


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection; the socket's timeout bounds each wait, so a
    connection the server leaves open fails the test with TimeoutError."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.fixture(scope="module")
def guarded_server(model_file: Path) -> str:
    """`oracle-mnist serve` with a 1 s head timeout and every other setting at its default."""
    with serving(
        serve_argv, {"ORACLE_MNIST_MODEL": str(model_file), "ORACLE_MNIST_HEAD_TIMEOUT": "1"}
    ) as url:
        yield url


def test_head_and_connection_bounds_come_from_the_environment():
    defaults = Settings.from_env({})
    assert (defaults.head_timeout, defaults.head_bytes, defaults.connections) == (10, 65536, None)
    env = {
        "ORACLE_MNIST_HEAD_TIMEOUT": "3",
        "ORACLE_MNIST_HEAD_BYTES": "8192",
        "ORACLE_MNIST_CONNECTIONS": "50",
    }
    settings = Settings.from_env(env)
    assert (settings.head_timeout, settings.head_bytes, settings.connections) == (3, 8192, 50)
    for name in ("HEAD_TIMEOUT", "HEAD_BYTES", "CONNECTIONS"):
        with pytest.raises(
            OracleMnistError, match=f"ORACLE_MNIST_{name}: expected a positive integer, got '0'"
        ):
            Settings.from_env({f"ORACLE_MNIST_{name}": "0"})


def test_serve_refuses_a_bad_bound_before_it_starts(monkeypatch, capsys):
    from oracle_mnist import cli, server

    monkeypatch.setenv("ORACLE_MNIST_HEAD_TIMEOUT", "soon")
    server.limits_from_env.cache_clear()  # read once per process
    try:
        with pytest.raises(SystemExit) as exc:
            cli.main(["serve", "--port", str(free_port())])
    finally:
        server.limits_from_env.cache_clear()
    assert exc.value.code == 1
    assert (
        "error: ORACLE_MNIST_HEAD_TIMEOUT: expected a positive integer, got 'soon'" in capsys.readouterr().err
    )


@pytest.mark.slow
def test_served_connections_that_send_no_complete_head_are_closed(guarded_server: str):
    addr = address(guarded_server)
    with (
        socket.create_connection(addr, timeout=15) as silent,
        socket.create_connection(addr, timeout=15) as request_line_only,
    ):
        request_line_only.sendall(b"GET /health HTTP/1.1\r\n")
        assert read_until_closed(silent) == b""  # nothing came, so there is nothing to answer
        answer = read_until_closed(request_line_only)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert answer.endswith(b'\r\n\r\n{"detail": "request head did not arrive within 1 s"}')


def head_of(size: int) -> bytes:
    """A GET /health head of exactly `size` bytes (request line, headers and the blank line)."""
    start, end = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: ", b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


def send_until_hung_up(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the server answers and closes long before all of it is sent
        sock.sendall(data)


@pytest.mark.slow
def test_served_multi_megabyte_head_gets_a_431_and_ordinary_requests_still_pass(guarded_server: str):
    addr = address(guarded_server)
    huge = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 << 20) + b"\r\n\r\n"
    with socket.create_connection(addr, timeout=30) as sock:
        sender = threading.Thread(target=send_until_hung_up, args=(sock, huge))
        sender.start()
        answer = read_until_closed(sock)
        sender.join(timeout=30)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b'"request head (request line and headers) over the limit of 65536 bytes"' in answer
    for size, status in ((65536, b"200"), (65537, b"431")):  # the limit is exact
        with socket.create_connection(addr, timeout=30) as sock:
            sock.sendall(head_of(size))
            assert read_until_closed(sock).startswith(b"HTTP/1.1 " + status), size
    # Untouched by the bounds: an upload many times the head limit (its head and the start of its body arrive
    # in one read), pipelined requests, and a kept-alive connection idle for longer than the head timeout.
    noise = encode(Image.effect_noise((700, 700), 60))
    assert len(noise) > 4 * 65536
    files = [("files", ("noise.png", noise, "image/png"))]
    assert httpx.post(f"{guarded_server}/predict", files=files, timeout=30).status_code == 200
    with socket.create_connection(addr, timeout=30) as sock:
        sock.sendall(
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /model HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert read_until_closed(sock).count(b"HTTP/1.1 200 OK\r\n") == 2
    conn = http.client.HTTPConnection(*addr, timeout=30)
    try:
        for pause in (0, 1.5):  # 1.5 s: past the head timeout, within uvicorn's 5 s keep-alive
            time.sleep(pause)
            conn.request("GET", "/health")
            assert conn.getresponse().read() == b'{"status":"ok","model":"resnet18","backend":"torch"}'
    finally:
        conn.close()


@pytest.mark.slow
def test_served_health_answers_while_slow_connections_outnumber_the_open_file_limit(model_file: Path):
    limit, slow = 256, 300

    def argv(port: int) -> list[str]:
        return with_open_file_limit(serve_argv(port), limit)

    # The default head timeout (10 s) outlasts the test: only the connection limit (half the open-file limit by
    # default) can make room. Plain uvicorn runs out of files and hangs up on /health without an answer.
    with serving(argv, {"ORACLE_MNIST_MODEL": str(model_file)}) as url, contextlib.ExitStack() as stack:
        socks = []
        for _ in range(slow):
            socks.append(stack.enter_context(socket.create_connection(address(url), timeout=10)))
            with contextlib.suppress(ConnectionResetError):  # already closed to make room for a newer one
                socks[-1].sendall(b"GET /health HTTP/1.1\r\n")
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
        closed = sum(closed_by_server(sock) for sock in socks)
    # The oldest waiting connections were closed to make room: at most `limit // 2` stayed open, /health's included.
    assert closed >= slow + 1 - limit // 2


def closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)  # a 408, or b"": closed
    except BlockingIOError:
        return False  # open, nothing to read
    except ConnectionResetError:
        return True  # closed before its request line arrived
    return True


@pytest.mark.slow
def test_api_image_command_serves_with_the_head_bounds(model_file: Path):
    env = {"ORACLE_MNIST_MODEL": str(model_file), "ORACLE_MNIST_HEAD_TIMEOUT": "1"}
    with serving(image_argv, env) as url, socket.create_connection(address(url), timeout=15) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
