"""Each conversion step on small hand-made images with known answers, plus the real sample."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oracle_mnist.errors import OracleMnistError
from oracle_mnist.images import convert, glyph_is_dark, otsu_threshold, resize_batch, to_gray, to_tensor


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


def test_convert_negates_resizes_longest_edge_and_centres():
    dark_on_light = Image.fromarray(cross(40, 20, ink=0, ground=255, half=4))
    out = convert(dark_on_light, 10)
    assert out.shape == (10, 10) and out.dtype == np.uint8
    # 40x20 -> 10x5, padded with 0 to a centred square: two columns left, three right.
    assert out[:, :2].max() == 0 and out[:, 7:].max() == 0
    assert out[:, 4].min() > 200 and out[5, 3:6].min() > 200  # both bars, now bright
    assert out[1, 2] < 30  # the ground, now dark
    wide = convert(Image.fromarray(cross(20, 40, ink=0, ground=255, half=4)), 10)
    assert wide[:2].max() == 0 and wide[7:].max() == 0 and wide[4].min() > 200


def test_convert_is_identity_on_the_real_sample_at_its_size(sample_dir: Path):
    images = sample_images(sample_dir)
    same = [np.array_equal(convert(Image.fromarray(img), 28), img) for img in images]
    assert sum(same) >= len(images) - 2  # the border rule misjudges one image in 2,400


def test_convert_brings_back_an_enlarged_tinted_dark_on_light_copy(sample_dir: Path):
    original = sample_images(sample_dir)[7]
    big = Image.fromarray(255 - original).resize((150, 150), Image.Resampling.BICUBIC)
    tinted = np.asarray(big.convert("RGB"), dtype=np.float64) * np.array([0.9, 0.8, 0.6])
    out = convert(Image.fromarray(tinted.astype(np.uint8)), 28)
    corr = np.corrcoef(out.ravel().astype(float), original.ravel().astype(float))[0, 1]
    assert corr > 0.95


def test_convert_refuses_bad_sizes():
    with pytest.raises(OracleMnistError, match="image size must be positive"):
        convert(Image.new("L", (4, 4)), 0)


def pillow_bicubic(images: np.ndarray, size: int) -> np.ndarray:
    return np.stack(
        [np.asarray(Image.fromarray(i).resize((size, size), Image.Resampling.BICUBIC)) for i in images]
    )


def test_resize_batch_is_pillow_bicubic_exactly(sample_dir: Path):
    images = sample_images(sample_dir)
    assert resize_batch(images, 28) is images
    for size in (14, 32, 64, 224):
        ours = resize_batch(images, size)
        assert ours.shape == (400, size, size) and ours.dtype == np.uint8
        assert np.array_equal(ours, pillow_bicubic(images, size)), size
    wide = images[:10, 4:24, :]  # not square: stretched to the square, as before
    assert np.array_equal(resize_batch(wide, 40), pillow_bicubic(wide, 40))


def test_featurized_and_served_pixels_are_identical_at_the_default_size(sample_dir: Path):
    images = sample_images(sample_dir)
    served = np.stack([convert(Image.fromarray(img), 64) for img in images])
    # The border rule judges one sample image dark-on-light and negates it; every other one must match.
    same = [np.array_equal(a, b) for a, b in zip(resize_batch(images, 64), served, strict=True)]
    assert same.count(False) == sum(glyph_is_dark(img) for img in images)


def test_resize_batch_refuses_non_uint8():
    with pytest.raises(OracleMnistError, match="expected uint8"):
        resize_batch(np.zeros((2, 4, 4), dtype=np.float32), 8)


def test_to_tensor_shapes_and_values():
    batch = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    t = to_tensor(batch, mean=0.5, std=0.25)
    assert t.shape == (1, 1, 2, 2) and t.dtype == torch.float32
    assert torch.allclose(t.flatten(), torch.tensor([-2.0, 2.0, -1.2, -0.4]))
    assert to_tensor(batch[0], 0.0, 1.0).shape == (1, 1, 2, 2)
    with pytest.raises(OracleMnistError, match="std must be positive"):
        to_tensor(batch, 0.0, 0.0)
