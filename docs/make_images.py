"""Regenerate the documentation's images (small PNGs under docs/images/):

- conversion.png: real sample glyphs made to look like the dataset's original scans (enlarged, dark ink on a
  light or tinted ground, off-centre, RGBA/palette/16-bit/CMYK; noisy, unevenly lit, small on a large sheet:
  the tests' renditions), and what `oracle_mnist.images.convert`, the one conversion featurize and serving
  share, makes of them;
- plots/*.png: every plot `dvc plots show` has for the repository's current results, rendered offline.

Run after `dvc repro` or `dvc pull`, from the repository root:

    python docs/make_images.py
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from oracle_mnist.datasets import read_idx
from oracle_mnist.errors import exit_on_error
from oracle_mnist.images import convert
from oracle_mnist.report import render_png, run_dvc, slug

# The tests' scan renditions (tests/helpers.py): the figure shows the cases the tests and benches measure.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import renditions

TILE = 84
# (label, scale, ground colour, ink colour, Pillow mode): one of each situation a scan or an upload brings.
RENDITIONS = [
    (0, 5.0, (235, 228, 210), (40, 30, 20), "RGB"),
    (1, 3.0, (250, 250, 250), (0, 0, 0), "L"),
    (2, 7.0, (200, 170, 120), (60, 40, 10), "P"),
    (3, 4.0, (20, 20, 20), (230, 230, 230), "I;16"),
    (5, 6.0, (255, 240, 240), (120, 0, 0), "CMYK"),
    (9, 2.5, (0, 0, 0), (20, 20, 60), "RGBA"),
]
# (label, the tests' rendition): the ground and placement cases the conversion normalises.
TEST_RENDITIONS = [(4, "noisy"), (6, "uneven light"), (7, "small, wide margins")]


def scan_like(
    glyph: np.ndarray, scale: float, ground: tuple, ink: tuple, mode: str, seed: int
) -> Image.Image:
    """A 28x28 white-on-black glyph as a scan might hold it: bigger, coloured, a little off-centre, in `mode`."""
    rng = np.random.default_rng(seed)
    side = round(28 * scale)
    alpha = (
        np.asarray(Image.fromarray(glyph).resize((side, side), Image.Resampling.BICUBIC), np.float64) / 255
    )
    # Scans are tight crops of one character: a margin of a few per cent, not evenly split.
    height, width = side + int(rng.integers(2, side // 6)), side + int(rng.integers(side // 8, side // 3))
    top, left = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
    canvas = np.empty((height, width, 3))
    canvas[:] = ground
    window = canvas[top : top + side, left : left + side]
    window[:] = window * (1 - alpha[..., None]) + np.asarray(ink) * alpha[..., None]
    rgb = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    if mode == "RGBA":
        # A cut-out: only the ink is opaque.
        mask = np.zeros((height, width), np.uint8)
        mask[top : top + side, left : left + side] = (alpha * 255).astype(np.uint8)
        rgb.putalpha(Image.fromarray(mask))
        return rgb
    if mode == "I;16":
        return Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16))
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return rgb.convert(mode)


def preview(img: Image.Image) -> Image.Image:
    """How a viewer shows the input: flattened to RGB on white, fitted into a tile."""
    if img.mode == "I;16":
        img = Image.fromarray((np.asarray(img, np.float64) / 257).astype(np.uint8))
    if img.mode == "RGBA":
        flat = Image.new("RGB", img.size, (255, 255, 255))
        flat.paste(img, mask=img.getchannel("A"))
        img = flat
    return ImageOps.pad(img.convert("RGB"), (TILE, TILE), color=(255, 255, 255))


def conversion_figure(sample: Path, out: Path) -> None:
    images = read_idx(sample / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(sample / "t10k-labels-idx1-ubyte.gz")
    columns = []
    for i, (label, scale, ground, ink, mode) in enumerate(RENDITIONS):
        glyph = images[int(np.flatnonzero(labels == label)[0])]
        scan = scan_like(glyph, scale, ground, ink, mode, seed=i)
        converted = Image.fromarray(convert(scan, 28)).resize((TILE, TILE), Image.Resampling.NEAREST)
        original = Image.fromarray(glyph).resize((TILE, TILE), Image.Resampling.NEAREST)
        columns.append((preview(scan), converted.convert("RGB"), original.convert("RGB")))
    for label, kind in TEST_RENDITIONS:
        glyph = images[int(np.flatnonzero(labels == label)[0])]
        scan = Image.fromarray(renditions(glyph)[kind])
        converted = Image.fromarray(convert(scan, 28)).resize((TILE, TILE), Image.Resampling.NEAREST)
        original = Image.fromarray(glyph).resize((TILE, TILE), Image.Resampling.NEAREST)
        columns.append((preview(scan), converted.convert("RGB"), original.convert("RGB")))
    pad = 4
    sheet = Image.new("RGB", (len(columns) * (TILE + pad) + pad, 3 * (TILE + pad) + pad), (128, 128, 128))
    for c, column in enumerate(columns):
        for r, tile in enumerate(column):
            sheet.paste(tile, (pad + c * (TILE + pad), pad + r * (TILE + pad)))
    save_small(sheet, out)


def save_small(img: Image.Image, path: Path, max_width: int = 640) -> None:
    """Charts are flat colours on white: 64 palette entries keep them sharp at a fraction of the bytes. Image
    plots (glyph grids, grey and noisy) keep 32 grey levels at the width a docs page shows anyway."""
    if img.mode in ("L", "LA", "I;16"):
        if img.width > max_width:
            size = (max_width, round(img.height * max_width / img.width))
            img = img.convert("L").resize(size, Image.Resampling.LANCZOS)
        img.convert("L").quantize(colors=32).save(path, optimize=True)
    else:
        img.convert("RGB").quantize(colors=64).save(path, optimize=True)


def pipeline_plots(repo: Path, out: Path) -> list[str]:
    """Render every plot of the repository's workspace results into `out` (emptied first)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        plots = json.loads(run_dvc(["plots", "show", "--json", "-o", tmp], repo) or "{}").get("data", {})
        for name, entries in sorted(plots.items()):
            for entry in entries:
                file = out / f"{slug(re.sub(r'[.](png|jpe?g|tsv|csv|json)$', '', name))}.png"
                if entry["type"] == "image":
                    save_small(Image.open(entry["url"]), file)
                else:
                    save_small(Image.open(io.BytesIO(render_png(entry["content"]))), file)
                written.append(file.name)
    return written


@exit_on_error
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repo", type=Path, default=Path.cwd(), help="repository with results (default: here)"
    )
    parser.add_argument(
        "--sample", type=Path, help="idx folder for the conversion figure (default: data/raw)"
    )
    args = parser.parse_args()
    images = Path(__file__).resolve().parent / "images"
    images.mkdir(exist_ok=True)
    sample = args.sample or args.repo / "data" / "raw"
    conversion_figure(sample, images / "conversion.png")
    for name in pipeline_plots(args.repo, images / "plots"):
        print(f"docs/images/plots/{name}")
    print("docs/images/conversion.png")


if __name__ == "__main__":
    main()
