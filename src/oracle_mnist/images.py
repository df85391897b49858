"""The paper's image conversion, shared unchanged by featurize (scans), training and serving.

Oracle-MNIST's 28x28 images were made from scans by: grayscale, negate when the glyph is darker than the
ground (Otsu), bicubic resize of the longest edge, centred zero padding. `convert` is that pipeline for any
image Pillow opens; `resize_batch` only rescales images that went through it already (the idx files);
`to_tensor` is the one normalisation every model input gets.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from oracle_mnist.errors import OracleMnistError

if TYPE_CHECKING:
    import torch


class BadImageError(OracleMnistError):
    """An input that is not a readable image: empty, not an image format, truncated or corrupt."""


class ImageTooLargeError(BadImageError):
    """An input over a size limit (bytes or pixels): refused before it is decoded."""


def open_image(
    data: bytes,
    name: str,
    max_pixels: int,
    max_bytes: int | None = None,
    formats: Sequence[str] | None = None,
    limit_name: str | None = None,
) -> Image.Image:
    """Decode untrusted `data` fully into a PIL image, or raise BadImageError naming `name` and the problem.

    The one decoder for scans (featurize) and uploads (CLI, API). The pixel count is checked from the header
    before decoding, so a decompression bomb costs nothing; `limit_name` names the setting in the message.
    `formats` limits which Pillow decoders may be tried (None: all).
    """
    if not data:
        raise BadImageError(f"{name}: empty file (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLargeError(f"{name}: file is larger than the limit of {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its own limit and twice it; `max_pixels` below is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name}: refused as a decompression bomb ({exc})") from None
    # Pillow's plugins raise many exception types on hostile bytes (struct.error, IndexError, ...): any of them
    # means "not a readable image", never a crash of the caller.
    except Exception:
        accepted = f" (accepted: {', '.join(formats)})" if formats else ""
        raise BadImageError(f"{name}: not an image file Pillow can read{accepted}") from None
    width, height = img.size
    if width * height > max_pixels:
        limit = f"{limit_name}={max_pixels}" if limit_name else f"the limit of {max_pixels}"
        raise ImageTooLargeError(
            f"{name}: {width}x{height} = {width * height} pixels is over {limit} "
            "(refused as a possible decompression bomb)"
        )
    if width < 1 or height < 1:
        raise BadImageError(f"{name}: image has no pixels ({width}x{height})")
    try:
        img.load()
    except Exception as exc:  # as above: whatever a decoder raises, the file is broken
        raise BadImageError(f"{name}: truncated or corrupt image: {exc}") from None
    return img


def otsu_threshold(gray: np.ndarray) -> int:
    """Otsu's threshold of a uint8 image: pixels > t are one class, <= t the other."""
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    w0 = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = 0.0
    return int(np.argmax(between))


def to_gray(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> uint8 (H, W) luminance.

    16-bit and float modes are scaled to 0..255 instead of clipped. Transparent pixels are laid on the ground
    colour that contrasts with the opaque ink, so both dark-ink and light-ink cut-outs keep their glyph.
    """
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0
        elif mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if mode == "P":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        luma = np.asarray(rgba.convert("RGB").convert("L"), dtype=np.float64)
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float64) / 255.0
        if alpha.sum() == 0:
            return np.zeros(luma.shape, dtype=np.uint8)
        ink_mean = float((luma * alpha).sum() / alpha.sum())
        ground = 255.0 if ink_mean < 128 else 0.0
        return np.clip(np.rint(luma * alpha + ground * (1.0 - alpha)), 0, 255).astype(np.uint8)
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if mode not in ("RGB", "1"):
        img = img.convert("RGB")
    return np.asarray(img.convert("L"), dtype=np.uint8)


def glyph_is_dark(gray: np.ndarray) -> bool:
    """True when the glyph is darker than the ground.

    The ground is the Otsu class holding most of the image border: a pixel-majority rule would misjudge thick
    glyphs (on the real sample it flips 174 of 2,400 images; the border rule flips 1).
    """
    t = otsu_threshold(gray)
    border = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
    return bool(np.median(border) > t)


def convert(img: Image.Image, size: int) -> np.ndarray:
    """Any image -> uint8 (size, size), white glyph on black, longest edge `size`, centred."""
    if size < 1:
        raise OracleMnistError(f"image size must be positive, got {size}")
    try:
        img = ImageOps.exif_transpose(img)
        gray = to_gray(img)
    except (OSError, ValueError) as exc:
        raise OracleMnistError(f"cannot read image ({img.mode}, {img.size}): {exc}") from exc
    if gray.size == 0:
        raise OracleMnistError("empty image (0 pixels)")
    if glyph_is_dark(gray):
        gray = 255 - gray
    h, w = gray.shape
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = np.asarray(Image.fromarray(gray).resize((new_w, new_h), Image.Resampling.BICUBIC))
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W) uint8 -> (N, size, size) uint8 by Pillow's bicubic; no-op at the same size.

    Image by image, the very resize `convert` applies: training and serving pixels are identical at every size
    (a vectorised copy of the filter was twice as fast but one grey level off on some images).
    """
    if images.ndim != 3 or images.dtype != np.uint8:
        raise OracleMnistError(f"expected uint8 (N, H, W) images, got {images.dtype} {images.shape}")
    if size < 1:
        raise OracleMnistError(f"image size must be positive, got {size}")
    if images.shape[1:] == (size, size):
        return images
    out = np.empty((len(images), size, size), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
    return out


def to_tensor(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """uint8 (N, S, S) or (S, S) -> float32 (N, 1, S, S), scaled to [0, 1] then standardised."""
    # torch is imported here so the data stages and the image conversion do not pay for loading it.
    import torch

    if images.dtype != np.uint8 or images.ndim not in (2, 3):
        raise OracleMnistError(
            f"expected uint8 (N, S, S) or (S, S) images, got {images.dtype} {images.shape}"
        )
    if std <= 0:
        raise OracleMnistError(f"std must be positive, got {std}")
    if images.ndim == 2:
        images = images[None]
    tensor = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float().div_(255.0)
    return tensor.sub_(mean).div_(std)


def sample_grid(
    images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], per_class: int = 10, scale: int = 2
) -> Image.Image:
    """One row per class: the first `per_class` examples, magnified, with "label name" on the left."""
    size = images.shape[1] * scale
    font = ImageFont.load_default(size=max(10, size // 3))
    label_width = max(int(font.getlength(f"{i} {name}")) for i, name in enumerate(class_names)) + 12
    pad = 2
    grid = Image.new("L", (label_width + per_class * (size + pad), len(class_names) * (size + pad)), 255)
    draw = ImageDraw.Draw(grid)
    for row, name in enumerate(class_names):
        top = row * (size + pad)
        draw.text((4, top + size // 2), f"{row} {name}", fill=0, font=font, anchor="lm")
        for col, index in enumerate(np.flatnonzero(labels == row)[:per_class]):
            tile = Image.fromarray(images[index]).resize((size, size), Image.Resampling.NEAREST)
            grid.paste(tile, (label_width + col * (size + pad), top))
    return grid
