"""Plain helpers shared by the tests and the benches (fixtures live in conftest.py): the repository's paths, dvc
and git runners, a throwaway copy of the repository, free ports, servers on 127.0.0.1 (a directory over HTTP,
any command that answers a URL, the API under uvicorn), PNG bombs and scan-like renditions of sample images.

Tests import it as `helpers` (pytest puts tests/ on sys.path, as it does for conftest); benches put tests/ on
sys.path themselves. Nothing here belongs in the library: it serves only tests and benches."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Mapping, Sequence
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# The real sample ships in the repository (data/sources/oracle-mnist-sample/README.md).
SAMPLE_DIR = REPO / "data/sources/oracle-mnist-sample"

# Shrunken settings for tests that run the pipeline: same code, less work.
TEST_PARAMS: dict[str, Any] = {
    # Native 28 px and two epochs of three batches: every code path of train/evaluate runs, in seconds.
    "featurize": {"image_size": 28},
    "train": {"epochs": 2, "warmup_epochs": 1, "batch_size": 32, "batches_per_epoch": 3, "threads": 1},
}

# --- params, subprocesses, a copy of the repository -------------------------------------------------------


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_params(repo: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Rewrite repo/params.yaml with `overrides` deep-merged in; returns the new params."""
    path = repo / "params.yaml"
    params = deep_merge(yaml.safe_load(path.read_text(encoding="utf-8")), overrides)
    path.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return params


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


def dvc(repo: Path, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd=repo, check=check, timeout=timeout)


def git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["git", *args], cwd=repo, check=check)


def make_repo_copy(dest: Path, sample_dir: Path | None, overrides: dict[str, Any] = TEST_PARAMS) -> Path:
    """A git+dvc copy of this repository's committed-or-new files (no DVC outputs, no caches), with
    params pointing at `sample_dir` and changed by `overrides` (the shrunken TEST_PARAMS unless told),
    committed as its first commit. `sample_dir` None: the committed params, dvc.lock and results as they are."""
    files = run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    if sample_dir is not None:
        (dest / "dvc.lock").unlink(missing_ok=True)
        write_params(dest, deep_merge({"data": {"source": str(sample_dir)}}, overrides))
    git(dest, "init", "-q", "-b", "main")
    git(dest, "config", "user.email", "test@example.com")
    git(dest, "config", "user.name", "test")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "test copy")
    return dest


# Debian's Chromium, headless, for the page's tests and bench: no sandbox (root), no GPU, and no connection
# anywhere but 127.0.0.1 (background services would hammer the closed network; other hosts must not resolve,
# so the page is proved to work offline).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


# --- servers on 127.0.0.1 -----------------------------------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on (the OS picked it free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves files without logging each request to stderr (it would bury test failures)."""

    def log_message(self, *args: Any) -> None:
        pass


class QuietServer(ThreadingHTTPServer):
    """A client that hangs up mid-answer (a stage stopped or timed out on purpose) is what those tests want;
    only other errors get socketserver's traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serve_directory(root: Path, handler: type[SimpleHTTPRequestHandler] = QuietHandler) -> Iterator[str]:
    """Serve `root` over HTTP on 127.0.0.1 in a thread; yield the base URL (ending in /)."""
    server = QuietServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@contextlib.contextmanager
def serve_command(
    cmd: Sequence[str], ready_url: str, env: Mapping[str, str] | None = None, startup_timeout: float = 60.0
) -> Iterator[subprocess.Popen]:
    """Run `cmd` (a server) with `env` added to the environment until the block ends; enter the block once
    `ready_url` answers 200. A server that exits or stays silent raises, with its output in the message."""
    # A file, not a pipe: nobody reads the log while the server runs, and a full pipe would block it.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)

        def output() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")

        try:
            deadline = time.monotonic() + startup_timeout
            while not _answers(ready_url):
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{cmd[:4]} exited with status {proc.returncode} at start-up:\n{output()}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{ready_url} did not answer within {startup_timeout} s:\n{output()}")
                time.sleep(0.1)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def uvicorn_command(port: int) -> list[str]:
    """The API server as a user starts it, on 127.0.0.1:`port`."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "oracle_mnist.api:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


@contextlib.contextmanager
def serve_in_subprocess(env: Mapping[str, str], startup_timeout: float = 60.0) -> Iterator[str]:
    """`uvicorn oracle_mnist.api:app` in a child process on a free port with `env` added to the environment;
    yield its base URL once /health answers; stop it on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [*uvicorn_command(port), "--no-access-log", "--log-level", "warning"]
    with serve_command(cmd, f"{url}/health", env, startup_timeout):
        yield url


# --- image files ----------------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _png(ihdr: bytes, *chunks: tuple[bytes, bytes]) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    body = b"".join(chunk(kind, data) for kind, data in [(b"IHDR", ihdr), *chunks, (b"IEND", b"")])
    return b"\x89PNG\r\n\x1a\n" + body


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit grey) but which holds no pixel data: a bomb's header."""
    return _png(struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A real 1-bit PNG of width x height black pixels: a few kB on disk, `width * height` pixels decoded."""
    row = b"\0" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    path.write_bytes(_png(struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0), (b"IDAT", idat)))
    return path


# --- scan-like renditions of the dataset's images (white glyph on black, 28x28) ------------------------------

PAPER = np.array([236.0, 224.0, 196.0])  # aged tan paper
INK = np.array([52.0, 38.0, 30.0])  # dark brown ink


def enlarge(glyph: np.ndarray, factor: float) -> np.ndarray:
    """`glyph` (uint8, any shape) enlarged by `factor` with Pillow's bicubic, as a scanner at a higher
    resolution would have seen it."""
    h, w = glyph.shape
    size = (round(w * factor), round(h * factor))
    return np.asarray(Image.fromarray(glyph).resize(size, Image.Resampling.BICUBIC))


def tint(glyph: np.ndarray, paper: np.ndarray = PAPER, ink_colour: np.ndarray = INK) -> np.ndarray:
    """A grey glyph (light ink on dark) as dark ink on coloured paper (default: brown on tan), RGB uint8."""
    ink = np.asarray(glyph, dtype=np.float64)[..., None] / 255.0
    return np.clip(paper * (1 - ink) + ink_colour * ink, 0, 255).astype(np.uint8)


# Paper colours a photographed rubbing or a scan may have: tan, grey, blue-grey, yellowed, pinkish.
PAPERS = {
    "tan": PAPER,
    "grey": np.array([178.0, 178.0, 178.0]),
    "blue-grey": np.array([190.0, 204.0, 216.0]),
    "yellow": np.array([240.0, 228.0, 150.0]),
    "pink": np.array([232.0, 200.0, 196.0]),
}


def noisy(rgb: np.ndarray, sigma: float = 10.0, seed: int = 0) -> np.ndarray:
    """`rgb` with Gaussian noise of `sigma` grey levels, as a phone camera adds."""
    rng = np.random.default_rng(seed)
    return np.clip(rgb + rng.normal(0.0, sigma, rgb.shape), 0, 255).astype(np.uint8)


def unevenly_lit(rgb: np.ndarray, darkest: float = 0.6) -> np.ndarray:
    """`rgb` lit from the right: the light falls off linearly to `darkest` at the left edge (and a little
    towards the top), as under a desk lamp."""
    h, w = rgb.shape[:2]
    light = np.linspace(darkest, 1.0, w)[None, :] * np.linspace(0.9, 1.0, h)[:, None]
    return np.clip(rgb * (light[..., None] if rgb.ndim == 3 else light), 0, 255).astype(np.uint8)


def on_sheet(
    rgb: np.ndarray, shape: tuple[int, int], top: int, left: int, paper: np.ndarray = PAPER
) -> np.ndarray:
    """`rgb` (an RGB rendition drawn on `paper`) placed at (top, left) on a larger sheet of that paper."""
    sheet = np.empty((*shape, 3), dtype=np.uint8)
    sheet[:] = paper.astype(np.uint8)
    sheet[top : top + rgb.shape[0], left : left + rgb.shape[1]] = rgb
    return sheet


def jpeg(pixels: np.ndarray, quality: int = 75) -> np.ndarray:
    """`pixels` after a JPEG round trip at `quality` (its block artefacts and ringing)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf))


def renditions(glyph: np.ndarray) -> dict[str, np.ndarray]:
    """A 28x28 dataset glyph as the scans and photos a user may hold, each differing from the dataset's image
    only in what the conversion normalises: the ground (tinted papers, noise, uneven light, JPEG) and the
    glyph's place and scale on a larger sheet."""
    big = enlarge(glyph, 5)
    out = {f"tinted {name}": tint(big, paper) for name, paper in PAPERS.items()}
    out["noisy"] = noisy(tint(big), 12.0)
    out["uneven light"] = unevenly_lit(tint(big))
    out["JPEG q60"] = jpeg(tint(big), 60)
    out["off-centre, large sheet"] = on_sheet(tint(big), (420, 520), 30, 340)
    out["small, wide margins"] = on_sheet(tint(enlarge(glyph, 2)), (320, 300), 150, 60)
    return out


def own_frame(glyph: np.ndarray) -> np.ndarray:
    """The glyph's own non-square frame: the dataset's images are scans resized to a 28-pixel longest edge and
    padded with exact zeros to a square, so dropping those zero columns (or rows) recovers the scan's frame."""
    cols = np.flatnonzero(glyph.max(axis=0) > 0)
    rows = np.flatnonzero(glyph.max(axis=1) > 0)
    if len(cols) <= len(rows):
        return glyph[:, cols[0] : cols[-1] + 1]
    return glyph[rows[0] : rows[-1] + 1]


# --- broken models ------------------------------------------------------------------------------------------


def broken_model_copy(model_file: Path, dest: Path, weight: float | None = None, **meta: Any) -> Path:
    """A copy of a saved model at `dest` with `meta` fields replaced and, when `weight` is given, that value
    written into the first weight tensor: files save_model itself would never write (it validates)."""
    import torch

    payload = torch.load(model_file, weights_only=True)
    payload["meta"] = {**payload["meta"], **meta}
    if weight is not None:
        first = next(name for name, t in payload["state_dict"].items() if t.is_floating_point())
        payload["state_dict"][first].view(-1)[0] = weight
    with open(dest, "wb") as fh:
        torch.save(payload, fh)
    return dest
