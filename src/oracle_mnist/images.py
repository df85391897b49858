"""The image conversion, shared unchanged by featurize (scans and idx images), training and serving.

Oracle-MNIST's 28x28 images were made from scans by: grayscale, negate when the glyph is darker than the
ground (Otsu), bicubic resize of the longest edge, centred zero padding. `convert` is that pipeline for any
image Pillow opens, plus what the paper's scans left to chance and uploads do not: the ground's level (tint,
grey paper, a lighting gradient) goes to 0, the ink to 255, and the glyph's box (not the sheet) fills the
square. `convert_batch` runs it over the idx images, so training and serving pixels come from one function;
`to_tensor` is the one normalisation every model input gets.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from oracle_mnist.config import DataConfig
from oracle_mnist.errors import OracleMnistError

if TYPE_CHECKING:
    import torch


# The decoder's ceiling for files a user or the data chose: params' data.max_pixels default, also the CLI's.
# Refuses decompression bombs from the header. The API's is lower (ORACLE_MNIST_MAX_PIXELS).
DEFAULT_MAX_PIXELS = DataConfig.model_fields["max_pixels"].default


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
    """Any image -> uint8 (size, size), white glyph on black ground 0, the glyph's box filling the square.

    The one conversion of scans, uploads and (through `convert_batch`) the idx images: see `convert_gray`.
    """
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
    return convert_gray(gray, size)


def convert_gray(gray: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W) luminance -> uint8 (size, size): the paper's steps, plus what its scans left to chance.

    On a working copy of at most WORK_SIDE pixels a side: the polarity (Otsu and the border), the ground
    (a plane fitted to the low cells, so a tint, a grey paper or a lighting gradient all go to 0), and the
    glyph's box (Otsu foreground of the flattened copy, trimmed so specks do not count). Then the square
    around that box is cut from the full-size image and resized by Pillow's bicubic in one step, and only
    that small square is flattened (ink / paper, as a flat-field correction) and stretched so the brightest
    ink is 255. Parts of the square outside the image are ground: 0.
    """
    full = Image.fromarray(gray)
    work = _working_copy(full)
    dark = glyph_is_dark(_detrended(work))
    if dark:
        work = 255 - work
    flat = _flatten(
        work.astype(np.float32), _ground_plane(work), *np.mgrid[0 : work.shape[0], 0 : work.shape[1]]
    )
    left, top, side = _glyph_square(flat)
    scale_x, scale_y = gray.shape[1] / work.shape[1], gray.shape[0] / work.shape[0]
    window = (left * scale_x, top * scale_y, (left + side) * scale_x, (top + side) * scale_y)
    # The ground and the ink level are measured again on the square at the dataset's own 28 px, so an image
    # and its enlarged, tinted or off-centre copy get the same ground and the same stretch.
    canonical = _cut_square(full, window, CANONICAL_SIDE, dark)
    ground = _ground_plane(canonical)
    centres = np.arange(CANONICAL_SIDE, dtype=np.float32)
    reference = _flatten(canonical, ground, centres[:, None], centres[None, :])
    inside = reference[np.isfinite(reference)]
    bright = max(MIN_BRIGHT, float(np.percentile(inside, 99.5))) if inside.size else MIN_BRIGHT
    square = _cut_square(full, window, size, dark)
    # Each output pixel's centre on the 28 px square, where the ground plane was fitted.
    at = (np.arange(size, dtype=np.float32) + 0.5) * (CANONICAL_SIDE / size) - 0.5
    out = _flatten(square, ground, at[:, None], at[None, :]) * (255.0 / bright)
    return np.nan_to_num(np.clip(np.rint(out), 0, 255), nan=0.0).astype(np.uint8)


def convert_batch(images: np.ndarray, size: int, workers: int = 1) -> np.ndarray:
    """(N, H, W) uint8 -> (N, size, size) uint8: `convert_gray` image by image (the idx files' featurize),
    so training and serving pixels come from the very same function; in `workers` processes."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise OracleMnistError(f"expected uint8 (N, H, W) images, got {images.dtype} {images.shape}")
    if size < 1:
        raise OracleMnistError(f"image size must be positive, got {size}")
    if workers <= 1 or len(images) < 512:
        return _convert_chunk((images, size))
    chunks = [(chunk, size) for chunk in np.array_split(images, workers * 4)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return np.concatenate(list(pool.map(_convert_chunk, chunks)))


def _convert_chunk(job: tuple[np.ndarray, int]) -> np.ndarray:
    images, size = job
    out = np.empty((len(images), size, size), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = convert_gray(image, size)
    return out


# The ground and the glyph's box are estimated on a copy this size at most: the cost of that work is bounded
# whatever the upload's size, and 256 px still resolves a glyph a quarter of the sheet wide at 64 px.
WORK_SIDE = 256
# The side of the square the ground and the ink level are measured on: the dataset's own.
CANONICAL_SIDE = 28
# Cells per side of the grid whose medians the ground plane is fitted to (fewer on tiny images).
GROUND_CELLS = 8
# The low percentile of each cell the ground plane is fitted to: the ground's own level (the dataset's
# scans are textured), below the glyph.
GROUND_PERCENTILE = 10
# A blurred pixel above this share of the Otsu threshold (ink against ground) belongs to the glyph's box.
CONTENT_SHARE = 0.3
# Foreground mass trimmed from each side of the box before it grows back over contiguous foreground.
BOX_TRIM = 0.01
# The ink level a stretch may not go below: a faint or empty image is not blown up into noise.
MIN_BRIGHT = 48.0


def _working_copy(full: Image.Image) -> np.ndarray:
    width, height = full.size
    if max(width, height) <= WORK_SIDE:
        return np.asarray(full)
    scale = WORK_SIDE / max(width, height)
    small = full.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BOX)
    return np.asarray(small)


def _detrended(work: np.ndarray) -> np.ndarray:
    """`work` less the plane fitted to its border, so a lighting gradient cannot flip the polarity rule."""
    h, w = work.shape
    if h < 3 or w < 3:
        return work
    rows, cols = np.mgrid[0:h, 0:w]
    edge = np.zeros((h, w), dtype=bool)
    edge[[0, -1]] = True
    edge[:, [0, -1]] = True
    design = np.stack([np.ones(edge.sum()), rows[edge], cols[edge]], axis=1)
    coef = np.linalg.lstsq(design, work[edge].astype(np.float64), rcond=None)[0]
    tilt = coef[1] * (rows - (h - 1) / 2) + coef[2] * (cols - (w - 1) / 2)
    return np.clip(np.rint(work - tilt), 0, 255).astype(np.uint8)


def _ground_plane(work: np.ndarray) -> np.ndarray:
    """(a, b, c) of the ground g(y, x) = a + b*y + c*x of a light-on-dark image (working coordinates).

    Fitted to a low percentile of each cell of a grid, three times, each fit to the lower half of the cells
    under the previous one, so cells the glyph or a frame's texture covers do not lift or tilt the ground.
    A tilted ground is then fitted again with the tilt taken out: within a cell a lighting gradient pulls the
    low percentile towards the cell's darker side, and that bias would leave the ground grey, not 0."""
    coef = _fit_ground(work)
    if coef[1] == 0 and coef[2] == 0:
        return coef
    rows, cols = np.mgrid[0 : work.shape[0], 0 : work.shape[1]]
    return _fit_ground(work - (coef[1] * rows + coef[2] * cols)) + np.array([0.0, coef[1], coef[2]])


def _fit_ground(work: np.ndarray) -> np.ndarray:
    """One fit of `_ground_plane`'s (a, b, c): the low cells' plane, with no correction for a tilt."""
    h, w = work.shape
    cells = max(1, min(GROUND_CELLS, h // 3, w // 3))
    ch, cw = h // cells, w // cells
    top, left = (h - ch * cells) // 2, (w - cw * cells) // 2
    block = work[top : top + ch * cells, left : left + cw * cells].reshape(cells, ch, cells, cw)
    # Outside the image (NaN) counts as brighter than any ground: cells mostly outside drop out.
    values = np.nan_to_num(block.transpose(0, 2, 1, 3).reshape(cells * cells, ch * cw), nan=1e6)
    levels = np.percentile(values, GROUND_PERCENTILE, axis=1)
    known = levels <= 255
    if not known.any():
        return np.zeros(3)
    centres = np.arange(cells) + 0.5  # times the cell size, minus half a pixel: the cells' centres as indices
    ys = np.repeat(top + centres * ch - 0.5, cells)
    xs = np.tile(left + centres * cw - 0.5, cells)
    if cells < 2 or known.sum() < 3:
        return np.array([float(levels[known].min()), 0.0, 0.0])
    levels, ys, xs = levels[known], ys[known], xs[known]
    design = np.stack([np.ones_like(ys), ys, xs], axis=1)
    keep = np.ones(len(levels), dtype=bool)
    for _ in range(3):
        coef = _least_squares(design[keep], levels[keep])
        residual = levels - design @ coef
        keep = residual <= np.median(residual)
    # Lowered to the low cells: on the dataset's own images the ground is the zero padding, and stays so.
    coef[0] += min(0.0, float(np.percentile(residual, 10)))
    return coef


def _least_squares(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The least-squares (a, b, c): normal equations, 3x3, far cheaper per call than lstsq on tiny grids; lstsq
    only where the kept cells are collinear."""
    try:
        return np.linalg.solve(design.T @ design, design.T @ target)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(design, target, rcond=None)[0]


def _flatten(image: np.ndarray, ground: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Light-on-dark float image -> ground 0, ink as the share of the paper's light it took (0..255)."""
    level = np.clip(ground[0] + ground[1] * ys + ground[2] * xs, 0.0, 254.0)
    return np.clip((image - level) * (255.0 / (255.0 - level)), 0.0, 255.0)


def _glyph_square(flat: np.ndarray) -> tuple[float, float, float]:
    """(left, top, side) of the square centred on the glyph's box, its side the box's longest edge; the whole
    image (centred) when there is no foreground to speak of."""
    h, w = flat.shape
    side = float(max(h, w))
    whole = ((w - side) / 2, (h - side) / 2, side)
    pixels = flat.astype(np.uint8)
    if pixels.max() < MIN_BRIGHT / 2:
        return whole
    # The box holds what differs from the ground at all (the glyph and the texture of the scan's own frame,
    # as the dataset's frames do), judged after a 3x3 median: isolated noise goes, edges stay where they are.
    smooth = np.asarray(Image.fromarray(pixels).filter(ImageFilter.MedianFilter(3)))
    mask = smooth > CONTENT_SHARE * otsu_threshold(pixels)
    if not mask.any():
        return whole
    x0, x1 = _extent(mask.sum(axis=0))
    y0, y1 = _extent(mask.sum(axis=1))
    side = float(max(x1 - x0, y1 - y0))
    return (x0 + x1 - side) / 2, (y0 + y1 - side) / 2, side


def _extent(counts: np.ndarray) -> tuple[int, int]:
    """[start, stop) of a projection's foreground: the span holding all but BOX_TRIM of the mass at either end,
    grown back over neighbouring non-empty rows/columns so a glyph's thin ends stay in and detached specks
    stay out."""
    cum = np.cumsum(counts)
    total = cum[-1]
    start = int(np.searchsorted(cum, BOX_TRIM * total, side="right"))
    stop = int(np.searchsorted(cum, (1 - BOX_TRIM) * total, side="left")) + 1
    while start > 0 and counts[start - 1] > 0:
        start -= 1
    while stop < len(counts) and counts[stop] > 0:
        stop += 1
    return start, stop


def _cut_square(
    full: Image.Image, window: tuple[float, float, float, float], size: int, dark: bool
) -> np.ndarray:
    """The `window` of `full` (full-size coordinates, may reach outside) resized to float32 (size, size) by
    Pillow's bicubic, light on dark; NaN where the window lies outside the image."""
    left, top, right, bottom = window
    width, height = full.size
    cut = (max(0.0, left), max(0.0, top), min(float(width), right), min(float(height), bottom))
    step_x, step_y = (right - left) / size, (bottom - top) / size
    col0, row0 = round((cut[0] - left) / step_x), round((cut[1] - top) / step_y)
    cols = max(1, min(size - col0, round((cut[2] - left) / step_x) - col0))
    rows = max(1, min(size - row0, round((cut[3] - top) / step_y) - row0))
    part = np.asarray(full.resize((cols, rows), Image.Resampling.BICUBIC, box=cut), dtype=np.float32)
    out = np.full((size, size), np.nan, dtype=np.float32)
    out[row0 : row0 + rows, col0 : col0 + cols] = 255.0 - part if dark else part
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
