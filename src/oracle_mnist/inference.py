"""Classify images of any size, colour mode and format with a saved model, through the training preprocessing.

The conversion is `images.convert` and the normalisation `images.to_tensor`, the very functions featurize and
train use, so a served model sees its inputs exactly as it saw them in training. Two backends run the same
weights: "torch" (models/model.pt) and "onnx" (models/model.onnx written by the export stage, which carries
the model's metadata inside the file).
"""

from __future__ import annotations

import ctypes
import json
import os
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import torch
from PIL import Image

from oracle_mnist.config import characters_of as characters_of
from oracle_mnist.errors import OracleMnistError
from oracle_mnist.images import DEFAULT_MAX_PIXELS as DEFAULT_MAX_PIXELS

# The decoder and its errors are re-exported: cli and api reach the library through this module only.
from oracle_mnist.images import BadImageError as BadImageError
from oracle_mnist.images import ImageTooLargeError as ImageTooLargeError
from oracle_mnist.images import convert, load_image, probe_image, to_tensor
from oracle_mnist.images import open_image as open_image
from oracle_mnist.metrics import softmax
from oracle_mnist.models import ModelMeta, ModelNotFoundError, load_model

BACKENDS = ("torch", "onnx")
DEFAULT_MODEL_PATHS = {"torch": Path("models/model.pt"), "onnx": Path("models/model.onnx")}
# Key of the ONNX metadata_props entry holding the ModelMeta as JSON.
ONNX_META_KEY = "oracle_mnist.meta"
# What the HTTP API decodes: common raster formats whose Pillow decoders are self-contained (no EPS, which
# runs Ghostscript, nor the rarer scientific formats). The CLI accepts anything Pillow reads.
SERVED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
# Largest local file `read_image_file` reads (a 40 Mpx uncompressed RGBA image is 160 MB).
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024
# Images per forward pass when classifying many files: bounds memory, not results.
BATCH_SIZE = 256
# Untrusted images are decoded and converted in two lanes of bounded concurrency, chosen by the pixel count in
# the header: up to LIGHT_PIXELS (any ordinary photo or scan), and larger ones up to the caller's max_pixels.
# A flood of huge uploads then queues behind itself, not in front of ordinary images, and memory is bounded:
# conversion holds at most ~11 bytes per pixel (4 decoded, 4 for a mode conversion, 3 uint8 planes).
LIGHT_PIXELS = 1_000_000
# Light-lane slots per heavy-lane slot (the heavy lane has one per concurrent forward pass).
LIGHT_SLOTS_PER_SLOT = 4


# Why an answer is flagged unsure (Prediction.unsure_reason): its probability is below the caller's minimum,
# or the image cannot hold a character at all, whatever the model says (a blank image gets a confident class).
UnsureReason = Literal["low_confidence", "no_ink", "too_small"]
# Narrower or shorter than this, an image holds no character: the dataset's glyphs are 28 px a side with
# strokes a few pixels wide, and below 8 px (2/7 of that) a stroke is less than a pixel. A choice, not a
# measurement: the conversion blows any image up to the model's size, so the model cannot tell by itself.
MIN_GLYPH_SIDE = 8
# The converted image (ground 0, the brightest ink stretched to 255) has ink where a pixel reaches half that;
# with under this share of such pixels it holds none: blank, uniform or faintly noisy images have 0, the
# sample's 2,400 real glyphs 1.9% or more at 28 px (2.5% at 64 and 96 px), and the scan-like renditions
# (tests/helpers.py) of 100 of them 4.8% or more.
INK_LEVEL = 128
MIN_INK_SHARE = 0.005


def unsure_reason(features: np.ndarray, size: tuple[int, int] | None = None) -> UnsureReason | None:
    """Why the image that converted to the uint8 (S, S) `features` cannot hold a character, else None: it was
    too small (`size`, its (width, height) before the conversion, when known), or has no ink at all."""
    if size is not None and min(size) < MIN_GLYPH_SIDE:
        return "too_small"
    if np.count_nonzero(features >= INK_LEVEL) < MIN_INK_SHARE * features.size:
        return "no_ink"
    return None


def in_a_clone() -> bool:
    """Whether the working directory is the root of a clone of this project (its dvc.yaml is here): only there
    do the default model paths exist after `dvc repro` or `dvc pull`, so only there is that the advice."""
    return Path("dvc.yaml").is_file()


# glibc's mallopt parameter number for the size above which malloc uses mmap (<malloc.h>).
_M_MMAP_THRESHOLD = -3


def return_freed_memory() -> None:
    """For a serving process: have glibc allocate every block over 1 MB with mmap, so freeing it gives the
    memory back to the system at once. By default glibc raises that threshold to 32 MB after the first such
    free; image-sized buffers (16 MB for a 16 Mpx plane) then land in per-thread heaps that are never
    trimmed, and RSS grows with every thread that once converted a large image (measured: 1.32 GB instead of
    0.80 GB after 48 conversions of 16 Mpx on 16 threads). A no-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


class ModelOutputError(OracleMnistError):
    """The model, not the input, is at fault: its outputs are not finite."""


@dataclass(frozen=True)
class Prediction:
    """The most likely class of one image and the `k` most likely ones, best first (calibrated
    probabilities). `unsure`: the image cannot hold a character (`unsure_reason` "too_small" or "no_ink") or
    the best probability is below the caller's minimum confidence ("low_confidence"; never with the default
    minimum of 0)."""

    index: int
    name: str
    probability: float
    top_k: tuple[tuple[int, str, float], ...]
    unsure_reason: UnsureReason | None = None

    @property
    def unsure(self) -> bool:
        return self.unsure_reason is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "probability": self.probability,
            "unsure": self.unsure,
            "unsure_reason": self.unsure_reason,
            "top_k": [{"index": i, "name": n, "probability": p} for i, n, p in self.top_k],
        }


def check_min_confidence(value: float, name: str = "min_confidence") -> float:
    """A minimum confidence below which an answer is flagged unsure: 0 (off) up to, not including, 1."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise OracleMnistError(
            f"{name}: expected a number from 0 (off) up to but not including 1, got {value!r}"
        )
    return float(value)


def read_image_file(
    path: str | Path, max_pixels: int, max_bytes: int = DEFAULT_MAX_FILE_BYTES, name: str | None = None
) -> Image.Image:
    """Decode a local image file: only a regular file (a FIFO would block, a device never end), read no
    further than `max_bytes`. Errors name `name` (default: the path)."""
    name = str(path) if name is None else name
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below like any non-file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BadImageError(f"{name}: no such file") from None
    except OSError as exc:
        raise BadImageError(f"{name}: cannot read: {exc.strerror or exc}") from None
    try:
        data = _read_regular(fd, name, max_bytes)
    finally:
        os.close(fd)
    return open_image(data, name, max_pixels, max_bytes)


def _read_regular(fd: int, name: str, max_bytes: int) -> bytes:
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        raise BadImageError(f"{name}: is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device or special file"
        raise BadImageError(f"{name}: is {kind}, not a regular file")
    if info.st_size > max_bytes:
        raise ImageTooLargeError(f"{name}: file is larger than the limit of {max_bytes} bytes")
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(max_bytes + 1)  # the file may have grown since fstat; open_image refuses that
    except OSError as exc:
        raise BadImageError(f"{name}: cannot read: {exc.strerror or exc}") from None


def _torch_runner(model: torch.nn.Module) -> Callable[[torch.Tensor], np.ndarray]:
    def run(batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return model(batch).float().numpy()

    return run


def _check_onnx_weights(path: Path) -> None:
    """Refuse an ONNX file whose floating-point initializers hold a NaN or an infinity. Needs the onnx package
    (installed with the export stage); a serving image without it relies on `_check_outputs` alone."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return
    graph = onnx.load(str(path), load_external_data=False).graph
    broken = [
        init.name
        for init in graph.initializer
        if np.issubdtype((arr := numpy_helper.to_array(init)).dtype, np.floating)
        and not np.isfinite(arr).all()
    ]
    if broken:
        raise OracleMnistError(
            f"{path}: weights are not finite (NaN or infinity) in {len(broken)} tensor(s): "
            f"{', '.join(broken[:5])}; the model is broken, re-export it"
        )


def _load_onnx(path: Path, threads: int | None) -> tuple[Callable[[torch.Tensor], np.ndarray], ModelMeta]:
    import onnxruntime as ort  # only the onnx backend needs it

    if not path.is_file():
        raise ModelNotFoundError(
            path, f"{path}: ONNX model file not found (run `dvc repro export` or `dvc pull`)"
        )
    try:
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
        raise OracleMnistError(f"{path}: not a readable ONNX model: {exc}") from None
    raw = session.get_modelmeta().custom_metadata_map.get(ONNX_META_KEY)
    if raw is None:
        raise OracleMnistError(f"{path}: no {ONNX_META_KEY} metadata; export it with stages/export.py")
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise OracleMnistError(f"{path}: {ONNX_META_KEY} metadata is not JSON") from None
    meta = ModelMeta.from_dict(parsed, str(path))
    _check_onnx_weights(path)
    input_name = session.get_inputs()[0].name

    def run(batch: torch.Tensor) -> np.ndarray:
        return session.run(None, {input_name: batch.numpy()})[0]

    return run, meta


class Predictor:
    """A model loaded once, classifying PIL images or converted feature arrays."""

    def __init__(
        self,
        meta: ModelMeta,
        run: Callable[[torch.Tensor], np.ndarray],
        backend: str,
        path: Path,
        concurrent: int = 1,
    ):
        self.meta = meta
        self.backend = backend
        self.path = path
        self._run = run
        # At most `concurrent` forward passes at once (callers on several threads, e.g. the API): together they
        # should use the cores, not oversubscribe them.
        self._slots = threading.BoundedSemaphore(concurrent)
        self._heavy_lane = threading.BoundedSemaphore(concurrent)
        self._light_lane = threading.BoundedSemaphore(LIGHT_SLOTS_PER_SLOT * concurrent)

    @classmethod
    def from_file(
        cls, model_path: str | Path | None = None, backend: str = "torch", threads: int | None = None
    ) -> Predictor:
        """Load a saved model. `threads`: cores per forward pass, and then as many passes run at once as
        fit the machine's cores; None: the backend's default (all cores) and one pass at a time."""
        if backend not in BACKENDS:
            raise OracleMnistError(f"backend: {backend!r} is not one of {list(BACKENDS)}")
        path = Path(model_path) if model_path is not None else DEFAULT_MODEL_PATHS[backend]
        if threads is not None and threads < 1:
            raise OracleMnistError(f"threads: must be 1 or more, got {threads}")
        concurrent = max(1, (os.cpu_count() or 1) // threads) if threads else 1
        if backend == "torch":
            if threads is not None:
                # Process-wide in torch; a serving process has this one model.
                torch.set_num_threads(threads)
            model, meta = load_model(path)
            predictor = cls(meta, _torch_runner(model), backend, path, concurrent)
        else:
            run, meta = _load_onnx(path, threads)
            predictor = cls(meta, run, backend, path, concurrent)
        predictor.check_outputs()
        return predictor

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.meta.class_names

    def check_top_k(self, top_k: int, name: str = "top_k") -> int:
        """`top_k` within the model's classes; an error names it `name` (the caller's option or field)."""
        if not 1 <= top_k <= len(self.class_names):
            raise OracleMnistError(f"{name}: must be between 1 and {len(self.class_names)}, got {top_k}")
        return top_k

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """uint8 (N, S, S) arrays exactly like featurize's, via the shared conversion."""
        size = self.meta.image_size
        if not images:
            return np.zeros((0, size, size), dtype=np.uint8)
        return np.stack([convert(img, size) for img in images])

    def features_of(self, img: Image.Image, name: str) -> np.ndarray:
        """One image's uint8 (S, S) features; a conversion failure becomes a BadImageError naming `name`."""
        try:
            return convert(img, self.meta.image_size)
        except OracleMnistError as exc:
            raise BadImageError(f"{name}: {exc}") from None
        except Exception as exc:  # a decodable but hostile image (odd EXIF, mode) is bad input, not a crash
            raise BadImageError(f"{name}: cannot convert image: {type(exc).__name__}: {exc}") from None

    def features_from(
        self,
        data: bytes | BinaryIO,
        name: str,
        max_pixels: int,
        max_bytes: int | None = None,
        formats: Sequence[str] | None = None,
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """One untrusted image's uint8 (S, S) features, decoded and converted in its lane (LIGHT_PIXELS), and
        its (width, height)."""
        img = probe_image(data, name, max_pixels, max_bytes, formats)
        lane = self._light_lane if img.width * img.height <= LIGHT_PIXELS else self._heavy_lane
        with lane:
            return self.features_of(load_image(img, name), name), img.size

    def logits(self, features: np.ndarray) -> np.ndarray:
        """float32 (N, C) logits for uint8 (N, S, S) feature arrays; a ModelOutputError if any is not finite."""
        chunks = []
        for start in range(0, len(features), BATCH_SIZE):
            batch = to_tensor(features[start : start + BATCH_SIZE], self.meta.mean, self.meta.std)
            with self._slots:
                chunks.append(self._run(batch))
        if not chunks:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        logits = np.concatenate(chunks)
        if not np.isfinite(logits).all():
            raise ModelOutputError(
                f"{self.path}: the model's outputs are not finite (NaN or infinity); the model is broken"
            )
        return logits

    def check_outputs(self) -> None:
        """Refuse a model whose logits or probabilities are not finite on a black, a white and a grey image:
        finite weights and metadata can still overflow, and a NaN must never reach anyone as a probability."""
        size = self.meta.image_size
        probe = np.stack([np.full((size, size), level, dtype=np.uint8) for level in (0, 128, 255)])
        self.probabilities(self.logits(probe))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The one place logits become the probabilities anyone is shown: calibrated by the model's
        temperature (a scalar: the most likely class is the same as without it). A ModelOutputError if any
        is not finite: the temperature is checked at load, and this is the last guard before a client."""
        with np.errstate(over="ignore", invalid="ignore"):  # refused just below, not warned about
            probs = softmax(logits, self.meta.temperature)
        if not np.isfinite(probs).all():
            raise ModelOutputError(
                f"{self.path}: the model's probabilities are not finite (temperature "
                f"{self.meta.temperature!r}); the model is broken"
            )
        return probs

    def predict_features(
        self,
        features: np.ndarray,
        top_k: int = 1,
        min_confidence: float = 0.0,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[Prediction]:
        """Predictions for uint8 (N, S, S) features; `sizes`: each image's (width, height) before conversion,
        so that one too small to hold a character is flagged (None: only the features are inspected)."""
        k = self.check_top_k(top_k)
        minimum = check_min_confidence(min_confidence)
        probs = self.probabilities(self.logits(features))
        names = self.class_names
        out = []
        for i, row in enumerate(probs):
            best = np.argsort(-row, kind="stable")[:k]
            ranked = tuple((int(j), names[j], float(row[j])) for j in best)
            reason = unsure_reason(features[i], sizes[i] if sizes is not None else None)
            if reason is None and ranked[0][2] < minimum:
                reason = "low_confidence"
            out.append(
                Prediction(
                    index=ranked[0][0],
                    name=ranked[0][1],
                    probability=ranked[0][2],
                    top_k=ranked,
                    unsure_reason=reason,
                )
            )
        return out

    def predict(
        self, images: Sequence[Image.Image], top_k: int = 1, min_confidence: float = 0.0
    ) -> list[Prediction]:
        self.check_top_k(top_k)
        check_min_confidence(min_confidence)
        sizes = [img.size for img in images]
        return self.predict_features(self.preprocess(images), top_k, min_confidence, sizes)
