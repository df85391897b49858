"""Each conversion step on small hand-made images with known answers, plus the real sample."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import INK, PAPERS, enlarge, on_sheet, renditions, tint, unevenly_lit
from PIL import Image

from oracle_mnist.errors import OracleMnistError
from oracle_mnist.images import convert, convert_batch, glyph_is_dark, otsu_threshold, to_gray, to_tensor


def sample_images(sample_dir: Path) -> np.ndarray:
    data = gzip.decompress((sample_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)


def cross(h: int, w: int, ink: int = 255, ground: int = 0, half: int = 1) -> np.ndarray:
    """A plus sign with bars 2 * half wide in the middle of an h x w ground."""
    img = np.full((h, w), ground, dtype=np.uint8)
    img[h // 2 - half : h // 2 + half, 1:-1] = ink
    img[1:-1, w // 2 - half : w // 2 + half] = ink
    return img


def test_otsu_separates_two_levels():
    img = np.array([[10] * 6 + [200] * 4] * 4, dtype=np.uint8)
    t = otsu_threshold(img)
    assert 10 <= t < 200


def test_to_gray_handles_unusual_modes():
    assert to_gray(Image.new("RGB", (2, 2), (255, 0, 0)))[0, 0] == 76  # ITU-R 601 luma of pure red
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 255))  # full black ink
    assert to_gray(cmyk).max() == 0
    i16 = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    assert i16.mode == "I;16" and to_gray(i16).tolist() == [[0, 255]]
    i32 = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert i32.mode == "I" and to_gray(i32).tolist() == [[0, 255]]
    pal = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 255, 255])
    assert to_gray(pal).tolist() == [[0, 255]]


def test_transparent_ground_contrasts_with_the_ink():
    dark_ink = np.zeros((4, 4, 4), dtype=np.uint8)  # black everywhere, opaque only at (0, 0)
    dark_ink[0, 0, 3] = 255
    gray = to_gray(Image.fromarray(dark_ink, mode="RGBA"))
    assert gray[0, 0] == 0 and gray[3, 3] == 255
    light_ink = dark_ink.copy()
    light_ink[..., :3] = 255
    gray = to_gray(Image.fromarray(light_ink, mode="RGBA"))
    assert gray[0, 0] == 255 and gray[3, 3] == 0


def test_glyph_darkness_is_judged_by_the_border():
    assert not glyph_is_dark(cross(12, 12))
    assert glyph_is_dark(cross(12, 12, ink=20, ground=230))
    thick = np.zeros((12, 12), dtype=np.uint8)
    thick[1:-1, 1:-1] = 255  # bright pixels are the majority, yet the glyph is the bright part
    assert not glyph_is_dark(thick)


def test_convert_negates_and_fills_the_square_with_the_glyph_box():
    # A 40x20 sheet whose cross spans 38x18: the box's longest edge fills the 10 px square, centred.
    out = convert(Image.fromarray(cross(40, 20, ink=0, ground=255, half=4)), 10)
    assert out.shape == (10, 10) and out.dtype == np.uint8
    assert out[:, :2].max() == 0 and out[:, 8:].max() == 0  # 18/38 of 10 px wide, in the middle
    assert out[0, 4:6].min() > 200 and out[-1, 4:6].min() > 200  # the vertical bar reaches both edges
    assert out[4:6, 2:8].min() > 150 and out[1, 2] == 0  # the horizontal bar bright, the ground 0
    wide = convert(Image.fromarray(cross(20, 40, ink=0, ground=255, half=4)), 10)
    assert np.abs(wide.astype(int) - out.T).max() <= 8  # the same up to the resampling's rounding


def test_convert_of_an_empty_or_uniform_image_is_all_ground():
    for img in (Image.new("L", (50, 40), 128), Image.new("RGB", (1, 1)), Image.new("L", (2, 300), 3)):
        out = convert(img, 8)
        assert out.shape == (8, 8) and out.max() == 0


def correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each pair of images in two (N, S, S) stacks."""
    x = a.reshape(len(a), -1).astype(np.float64)
    y = b.reshape(len(b), -1).astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    y -= y.mean(axis=1, keepdims=True)
    return (x * y).sum(axis=1) / np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))


def test_dataset_images_stay_close_to_what_they_are(sample_dir: Path):
    """The dataset's own images already have a dark ground and a glyph filling the frame: the normalisation
    moves them little (measured on the 400: median r 0.997, mean absolute difference 8 grey levels)."""
    images = sample_images(sample_dir)
    converted = convert_batch(images, 28)
    assert np.median(correlations(converted, images)) > 0.98
    assert np.median(np.abs(converted.astype(int) - images).mean(axis=(1, 2))) < 12


@pytest.mark.parametrize("kind", list(renditions(np.zeros((28, 28), np.uint8))))
def test_each_rendition_converts_like_the_plain_image(sample_dir: Path, kind: str):
    """Tinted papers, noise, uneven light, JPEG, an off-centre glyph on a large sheet and a small one: each
    converts to nearly the array the plain 28x28 image does (measured on these 40: median r 0.987-0.995,
    median mean absolute difference 5-9 grey levels; the paper's conversion alone: 23-115 levels off, and r
    near 0 for the sheets)."""
    images = sample_images(sample_dir)[:40]
    plain = convert_batch(images, 28)
    scans = np.stack([convert(Image.fromarray(renditions(g)[kind]), 28) for g in images])
    assert np.median(correlations(scans, plain)) > 0.97, kind
    assert np.median(np.abs(scans.astype(int) - plain).mean(axis=(1, 2))) < 12, kind


def test_specks_far_from_the_glyph_do_not_move_the_box(sample_dir: Path):
    images = sample_images(sample_dir)[:20]
    plain = convert_batch(images, 28)
    rng = np.random.default_rng(0)
    specked = []
    for glyph in images:
        sheet = on_sheet(tint(enlarge(glyph, 4)), (260, 300), 60, 70)
        for _ in range(6):  # dust: 2x2 dark dots scattered over the margins
            y, x = int(rng.integers(0, 50)), int(rng.integers(0, 296))
            sheet[y : y + 2, x : x + 2] = INK.astype(np.uint8)
        specked.append(convert(Image.fromarray(sheet), 28))
    assert np.median(correlations(np.stack(specked), plain)) > 0.97


def test_ground_goes_to_zero_whatever_the_paper(sample_dir: Path):
    """The plain image's zero padding stays 0 when it is paper of any colour (before: 30 to 77 levels)."""
    glyph = sample_images(sample_dir)[3]
    padding = glyph == 0
    for paper in PAPERS.values():
        out = convert(Image.fromarray(tint(glyph, paper)), 28)
        assert np.median(out[padding]) == 0 and np.mean(out[padding]) < 8


def test_ground_goes_to_zero_under_uneven_light(sample_dir: Path):
    """A lighting gradient biases each ground cell's low percentile towards its darker side; the ground is
    fitted again without the tilt, so the plain image's padding stays near 0 (measured on these 40: median
    mean level 3 grey levels; 8 with the bias)."""
    levels = []
    for glyph in sample_images(sample_dir)[:40]:
        padding = convert_batch(glyph[None], 28)[0] == 0
        if padding.sum() > 20:
            out = convert(Image.fromarray(unevenly_lit(tint(enlarge(glyph, 5)))), 28)
            levels.append(out[padding].mean())
    assert len(levels) > 20
    assert np.median(levels) < 5


def test_convert_brings_back_an_enlarged_tinted_dark_on_light_copy(sample_dir: Path):
    original = sample_images(sample_dir)[7]
    big = Image.fromarray(255 - original).resize((150, 150), Image.Resampling.BICUBIC)
    tinted = np.asarray(big.convert("RGB"), dtype=np.float64) * np.array([0.9, 0.8, 0.6])
    out = convert(Image.fromarray(tinted.astype(np.uint8)), 28)
    corr = np.corrcoef(out.ravel().astype(float), convert_batch(original[None], 28)[0].ravel().astype(float))
    assert corr[0, 1] > 0.95


def test_convert_refuses_bad_sizes():
    with pytest.raises(OracleMnistError, match="image size must be positive"):
        convert(Image.new("L", (4, 4)), 0)


def test_featurized_idx_images_are_the_served_conversion_exactly(sample_dir: Path):
    images = sample_images(sample_dir)[:100]
    for size in (28, 64):
        featurized = convert_batch(images, size)
        served = np.stack([convert(Image.fromarray(img), size) for img in images])
        assert featurized.shape == (100, size, size) and np.array_equal(featurized, served)


def test_convert_batch_in_processes_is_the_same_conversion(sample_dir: Path):
    images = sample_images(sample_dir)[:300]
    doubled = np.concatenate([images, images[:, ::-1]])  # 600: enough to use the processes
    np.testing.assert_array_equal(convert_batch(doubled, 28, workers=2), convert_batch(doubled, 28))


def test_convert_batch_refuses_non_uint8():
    with pytest.raises(OracleMnistError, match="expected uint8"):
        convert_batch(np.zeros((2, 4, 4), dtype=np.float32), 8)


def test_to_tensor_shapes_and_values():
    batch = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    t = to_tensor(batch, mean=0.5, std=0.25)
    assert t.shape == (1, 1, 2, 2) and t.dtype == torch.float32
    assert torch.allclose(t.flatten(), torch.tensor([-2.0, 2.0, -1.2, -0.4]))
    assert to_tensor(batch[0], 0.0, 1.0).shape == (1, 1, 2, 2)
    with pytest.raises(OracleMnistError, match="std must be positive"):
        to_tensor(batch, 0.0, 0.0)
