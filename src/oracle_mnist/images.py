"""The paper's image conversion, shared unchanged by featurize (scans), training and serving.

Oracle-MNIST's 28x28 images were made from scans by: grayscale, negate when the glyph is darker than the
ground (Otsu), bicubic resize of the longest edge, centred zero padding. `convert` is that pipeline for any
image Pillow opens; `resize_batch` only rescales images that went through it already (the idx files);
`to_tensor` is the one normalisation every model input gets.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageDraw, ImageFont, ImageOps

from oracle_mnist.config import DataConfig
from oracle_mnist.errors import OracleMnistError

if TYPE_CHECKING:
    import torch


# The decoder's ceiling for files a user or the data chose: params' data.max_pixels default, also the CLI's.
# Refuses decompression bombs from the header. The API's is lower (ORACLE_MNIST_MAX_PIXELS).
DEFAULT_MAX_PIXELS = DataConfig.max_pixels


class BadImageError(OracleMnistError):
    """An input that is not a readable image: empty, not an image format, truncated or corrupt."""


class ImageTooLargeError(BadImageError):
    """An input over a size limit (bytes or pixels): refused before it is decoded."""


def open_image(
    data: bytes | BinaryIO,
    name: str,
    max_pixels: int,
    max_bytes: int | None = None,
    formats: Sequence[str] | None = None,
    limit_name: str | None = None,
) -> Image.Image:
    """Decode untrusted `data` fully into a PIL image, or raise BadImageError naming `name` and the problem.

    The one decoder for scans (featurize) and uploads (CLI, API): `probe_image` then `load_image`.
    """
    return load_image(probe_image(data, name, max_pixels, max_bytes, formats, limit_name), name)


def probe_image(
    data: bytes | BinaryIO,
    name: str,
    max_pixels: int,
    max_bytes: int | None = None,
    formats: Sequence[str] | None = None,
    limit_name: str | None = None,
) -> Image.Image:
    """Read only the header of untrusted `data` (bytes, or a seekable binary file read from its start): a
    lazy image whose size is within `max_pixels`, or a BadImageError naming `name` and the problem.

    The pixel count is checked before decoding, so a decompression bomb costs nothing, and a caller can
    budget the decoding by the size; `limit_name` names the setting in the message. `formats` limits which
    Pillow decoders may be tried (None: all).
    """
    size = _byte_size(data)
    if size == 0:
        raise BadImageError(f"{name}: empty file (0 bytes)")
    if max_bytes is not None and size > max_bytes:
        raise ImageTooLargeError(f"{name}: file is larger than the limit of {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its own limit and twice it; `max_pixels` below is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data, formats=formats)
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
    return img


def load_image(img: Image.Image, name: str) -> Image.Image:
    """Decode the pixels of a `probe_image` result; a broken file is a BadImageError naming `name`."""
    try:
        img.load()
    except Exception as exc:  # as in probe_image: whatever a decoder raises, the file is broken
        raise BadImageError(f"{name}: truncated or corrupt image: {exc}") from None
    return img


def _byte_size(data: bytes | BinaryIO) -> int:
    if isinstance(data, bytes):
        return len(data)
    size = data.seek(0, io.SEEK_END)
    data.seek(0)
    return size


def otsu_threshold(gray: np.ndarray) -> int:
    """Otsu's threshold of a uint8 image: pixels > t are one class, <= t the other."""
    # Pillow's histogram, not np.bincount: bincount makes an int64 copy, 8 bytes per pixel of a huge upload.
    hist = np.asarray(Image.fromarray(gray).histogram(), dtype=np.float64)
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
    Works on bands of rows: the only full-size arrays are the uint8 result and Pillow's own images.
    """
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _wide_to_gray(img)
    if mode == "P":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return _transparent_to_gray(img if mode == "RGBA" else img.convert("RGBA"))
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if mode not in ("RGB", "1"):
        img = img.convert("RGB")
    return np.asarray(img.convert("L"), dtype=np.uint8)


def _row_bands(img: Image.Image, pixels: int = 2**18) -> Iterator[tuple[slice, Image.Image]]:
    """(rows, that band of `img`) for bands of about `pixels` pixels, top to bottom."""
    width, height = img.size
    step = max(1, pixels // width)
    for top in range(0, height, step):
        bottom = min(height, top + step)
        yield slice(top, bottom), img.crop((0, top, width, bottom))


def _wide_to_gray(img: Image.Image) -> np.ndarray:
    """16-bit, 32-bit integer and float images -> uint8, scaled like their range suggests."""
    mode = img.mode
    _, high = img.getextrema()
    divisor, factor = 1.0, 1.0
    if mode.startswith("I;16") or (mode == "I" and high > 255):
        divisor = 257.0
    elif mode == "F" and high <= 1.0:
        factor = 255.0
    out = np.empty((img.height, img.width), dtype=np.uint8)
    for rows, band in _row_bands(img):
        out[rows] = np.clip(np.rint(np.asarray(band, dtype=np.float64) / divisor * factor), 0, 255)
    return out


def _transparent_to_gray(rgba: Image.Image) -> np.ndarray:
    """RGBA -> uint8 luminance laid on the ground that contrasts with the ink, in integers: the exact
    rounding of luma * a/255 + ground * (1 - a/255), which is never halfway (255 is odd)."""
    out = np.empty((rgba.height, rgba.width), dtype=np.uint8)
    alpha_total = ink_total = 0
    for rows, band in _row_bands(rgba):
        out[rows] = band.convert("L")
        alpha = np.asarray(band.getchannel("A"), dtype=np.uint32)
        alpha_total += int(alpha.sum(dtype=np.int64))
        ink_total += int((out[rows] * alpha).sum(dtype=np.int64))
    if alpha_total == 0:
        return np.zeros_like(out)
    # The alpha-weighted mean luma is under 128: dark ink, so a light ground.
    ground = 255 if ink_total < 128 * alpha_total else 0
    for rows, band in _row_bands(rgba):
        alpha = np.asarray(band.getchannel("A"))
        if alpha.min() < 255:  # opaque bands are their luma already
            weight = alpha.astype(np.uint32)
            out[rows] = (out[rows] * weight + ground * (255 - weight) + 127) // 255
    return out


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
        # exif_transpose copies the whole image even when there is nothing to turn.
        if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
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

    Image by image, the very resize `convert` applies, so training and serving pixels are identical at every
    size. A vectorised copy of the filter was faster but up to 2 grey levels off; this way the full dataset's
    30,222 images take under a second at 64 px (bench/featurize.py).
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
