"""Predictor: the training preprocessing on any image, both backends, top-k, and every kind of bad input."""

from __future__ import annotations

import json
import os
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import broken_model_copy, encode, enlarge, png_header_only, tint
from PIL import Image

from oracle_mnist.errors import OracleMnistError
from oracle_mnist.images import convert, convert_batch, to_gray
from oracle_mnist.inference import (
    ONNX_META_KEY,
    BadImageError,
    ImageTooLargeError,
    ModelOutputError,
    Predictor,
    open_image,
    read_image_file,
    softmax,
    unsure_reason,
)
from oracle_mnist.models import ModelMeta

CLASSES = ("big", "sun", "moon", "cattle", "next", "field", "not", "arrow", "time", "wood")


def fixed_predictor(logits: np.ndarray, image_size: int = 28) -> Predictor:
    """A Predictor whose backend returns `logits` for any batch: tests the ranking without a network."""
    meta = ModelMeta("fixed", CLASSES, image_size, 0.5, 0.25, "d", "p")
    return Predictor(meta, lambda batch: np.repeat(logits[None], len(batch), axis=0), "torch", Path("fixed"))


# --- reading files and bytes ---------------------------------------------------------------------------


def test_open_image_decodes_every_format_and_mode(sample_test_images):
    glyph = sample_test_images[0][3]
    for mode, fmt in [
        ("L", "PNG"),
        ("RGB", "JPEG"),
        ("RGBA", "PNG"),
        ("P", "GIF"),
        ("I;16", "TIFF"),
        ("CMYK", "TIFF"),
    ]:
        img = open_image(encode(Image.fromarray(glyph).convert(mode), fmt), f"x.{fmt}", max_pixels=10_000)
        assert img.size == (28, 28)
        assert img.mode.startswith(mode[:1])


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", BadImageError, "x.png: empty file"),
        (b"%PDF-1.4 not a picture", BadImageError, "x.png: not an image file"),
        (encode(Image.new("L", (64, 64), 200))[:-40], BadImageError, "x.png: truncated or corrupt"),
        (
            encode(Image.new("L", (200, 100))),
            ImageTooLargeError,
            "x.png: 200x100 = 20000 pixels is over the limit of 10000",
        ),
        (png_header_only(100_000, 100_000), ImageTooLargeError, "x.png: .*pixels"),
    ],
    ids=["empty", "not-an-image", "truncated", "too-many-pixels", "decompression-bomb-header"],
)
def test_open_image_refuses_bad_input_naming_the_file(data, error, message):
    with pytest.raises(error, match=message):
        open_image(data, "x.png", max_pixels=10_000)


def test_open_image_refuses_too_many_bytes():
    data = encode(Image.new("L", (10, 10)))
    with pytest.raises(
        ImageTooLargeError, match=f"x.png: file is larger than the limit of {len(data) - 1} bytes"
    ):
        open_image(data, "x.png", max_pixels=10_000, max_bytes=len(data) - 1)
    assert open_image(data, "x.png", max_pixels=10_000, max_bytes=len(data)).size == (10, 10)


def test_read_image_file_names_missing_files_and_directories(tmp_path: Path):
    with pytest.raises(BadImageError, match=f"{tmp_path / 'nope.png'}: no such file"):
        read_image_file(tmp_path / "nope.png", 10_000)
    with pytest.raises(BadImageError, match="is a directory"):
        read_image_file(tmp_path, 10_000)


# --- the preprocessing is featurize's ------------------------------------------------------------------


def test_png_of_an_idx_image_gives_the_featurize_array(model_file: Path, sample_test_images):
    """The file path (encode, decode, convert) reproduces featurize's idx features byte for byte: both are the
    one conversion."""
    images, _ = sample_test_images
    predictor = Predictor.from_file(model_file)
    served = np.stack(
        [predictor.preprocess([open_image(encode(Image.fromarray(g)), "g", 10_000)])[0] for g in images]
    )
    featurized = convert_batch(images, 28)
    np.testing.assert_array_equal(served, featurized)
    np.testing.assert_array_equal(predictor.logits(served), predictor.logits(featurized))


def test_preprocess_at_another_size_matches_featurize(sample_test_images):
    images = sample_test_images[0][:50]
    served = fixed_predictor(np.zeros(10), image_size=32).preprocess([Image.fromarray(g) for g in images])
    np.testing.assert_array_equal(served, convert_batch(images, 32))


def test_scan_like_renditions_come_back_close_to_the_featurized_images(sample_test_images):
    images = sample_test_images[0][:40]
    featurized = convert_batch(images, 28)
    predictor = fixed_predictor(np.zeros(10))
    for fmt in ("PNG", "JPEG"):
        scans = [encode(Image.fromarray(tint(enlarge(g, 5))), fmt) for g in images]
        served = [predictor.preprocess([open_image(scan, "s", 10**6)])[0] for scan in scans]
        corr = [
            np.corrcoef(s.ravel().astype(float), g.ravel().astype(float))[0, 1]
            for s, g in zip(served, featurized, strict=True)
        ]
        mad = [np.abs(s.astype(int) - g).mean() for s, g in zip(served, featurized, strict=True)]
        assert np.median(corr) > 0.97 and np.median(mad) < 10, fmt


# --- ranking and backends --------------------------------------------------------------------------------


def test_predictions_rank_classes_by_probability():
    logits = np.array([0.0, 3.0, 1.0, -1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.5], dtype=np.float32)
    (pred,) = fixed_predictor(logits).predict([Image.new("L", (28, 28))], top_k=3)
    expected = softmax(logits[None])[0]
    assert (pred.index, pred.name) == (1, "sun")
    assert pred.probability == pytest.approx(expected[1])
    assert [(i, n) for i, n, _ in pred.top_k] == [(1, "sun"), (4, "next"), (2, "moon")]
    assert [p for _, _, p in pred.top_k] == pytest.approx(expected[[1, 4, 2]])
    assert pred.to_dict()["top_k"][1] == {
        "index": 4,
        "name": "next",
        "probability": pytest.approx(expected[4]),
    }


def test_images_that_cannot_hold_a_character_are_unsure_whatever_the_model_says(
    model_file: Path, sample_test_images
):
    glyphs = [Image.fromarray(g) for g in sample_test_images[0][:3]]
    scan = Image.fromarray(tint(enlarge(sample_test_images[0][3], 4)))
    hollow = {
        "white": Image.new("L", (100, 100), 255),
        "black": Image.new("L", (100, 100), 0),
        "tan paper": Image.new("RGB", (300, 200), (200, 180, 150)),
        "faint noise": Image.effect_noise((100, 100), 5),
    }
    tiny = {
        "1x1": Image.new("L", (1, 1), 0),
        "4x4 cross": Image.fromarray((np.eye(4) * 255).astype(np.uint8)),
        "a glyph in 7 px": glyphs[0].resize((7, 7)),
        "a strip": Image.new("L", (300, 5), 255),
    }
    images = [*glyphs, scan, *hollow.values(), *tiny.values()]
    predictions = Predictor.from_file(model_file).predict(images, top_k=2)
    reasons = [p.unsure_reason for p in predictions]
    assert reasons == [None] * 4 + ["no_ink"] * len(hollow) + ["too_small"] * len(tiny)
    for pred in predictions:
        assert pred.unsure == (pred.unsure_reason is not None)
        assert pred.to_dict()["unsure_reason"] == pred.unsure_reason
    # A glyph at the smallest side that is not flagged.
    assert unsure_reason(convert(glyphs[0].resize((8, 8)), 28), (8, 8)) is None


def test_the_sample_glyphs_are_never_flagged_as_holding_no_ink(sample_test_images):
    features = convert_batch(sample_test_images[0], 28)
    assert [i for i, f in enumerate(features) if unsure_reason(f, (28, 28))] == []


def test_a_low_confidence_is_the_reason_only_when_the_image_holds_a_character(
    model_file: Path, sample_test_images
):
    predictor = Predictor.from_file(model_file)
    images = [Image.fromarray(sample_test_images[0][0]), Image.new("L", (50, 50), 255)]
    predictions = predictor.predict(images, min_confidence=0.99)
    assert [p.unsure_reason for p in predictions] == ["low_confidence", "no_ink"]


@pytest.mark.parametrize("top_k", [0, 11])
def test_top_k_must_be_within_the_classes(top_k):
    with pytest.raises(OracleMnistError, match=f"top_k: must be between 1 and 10, got {top_k}"):
        fixed_predictor(np.zeros(10)).predict([Image.new("L", (28, 28))], top_k=top_k)


def test_torch_backend_matches_the_saved_model(model_file: Path, sample_test_images):
    from oracle_mnist.images import to_tensor
    from oracle_mnist.models import load_model

    images = sample_test_images[0][:16]
    model, meta = load_model(model_file)
    with torch.no_grad():
        expected = model(to_tensor(images, meta.mean, meta.std)).numpy()
    predictor = Predictor.from_file(model_file, "torch")
    assert predictor.meta == meta
    np.testing.assert_allclose(predictor.logits(images), expected, rtol=0, atol=1e-6)
    preds = predictor.predict([Image.fromarray(g) for g in images], top_k=2)
    converted = predictor.logits(convert_batch(images, meta.image_size))
    assert [p.index for p in preds] == converted.argmax(axis=1).tolist()


def test_onnx_backend_agrees_with_torch(
    calibrated_model_file: Path, onnx_model_file: Path, sample_test_images
):
    images = [Image.fromarray(g) for g in sample_test_images[0][:32]]
    by_torch = Predictor.from_file(calibrated_model_file, "torch").predict(images, top_k=3)
    by_onnx = Predictor.from_file(onnx_model_file, "onnx")
    # The metadata travels inside the .onnx.
    assert by_onnx.meta == Predictor.from_file(calibrated_model_file).meta
    for a, b in zip(by_torch, by_onnx.predict(images, top_k=3), strict=True):
        assert [i for i, _, _ in a.top_k] == [i for i, _, _ in b.top_k]
        assert a.probability == pytest.approx(b.probability, abs=1e-5)


def test_many_images_are_classified_in_batches(model_file: Path, sample_test_images, monkeypatch):
    import oracle_mnist.inference as inference

    images = sample_test_images[0][:40]
    predictor = Predictor.from_file(model_file)
    whole = predictor.logits(images)
    monkeypatch.setattr(inference, "BATCH_SIZE", 7)
    np.testing.assert_allclose(predictor.logits(images), whole, rtol=0, atol=1e-5)
    assert predictor.logits(images[:0]).shape == (0, 10)


def test_from_file_names_the_problem(tmp_path: Path, model_file: Path):
    with pytest.raises(OracleMnistError, match="backend: 'tf' is not one of"):
        Predictor.from_file(model_file, "tf")
    with pytest.raises(OracleMnistError, match=f"{tmp_path / 'missing.pt'}: model file not found"):
        Predictor.from_file(tmp_path / "missing.pt", "torch")
    with pytest.raises(OracleMnistError, match=f"{tmp_path / 'missing.onnx'}: ONNX model file not found"):
        Predictor.from_file(tmp_path / "missing.onnx", "onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    with pytest.raises(OracleMnistError, match=f"{junk}: not a readable ONNX model"):
        Predictor.from_file(junk, "onnx")


def test_onnx_without_our_metadata_is_refused(tmp_path: Path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "foreign.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(OracleMnistError, match=f"{path}: no oracle_mnist.meta metadata"):
        Predictor.from_file(path, "onnx")


def test_threads_per_pass_change_speed_not_results(onnx_model_file: Path, sample_test_images):
    images = sample_test_images[0][:8]
    default = Predictor.from_file(onnx_model_file, "onnx")
    single = Predictor.from_file(onnx_model_file, "onnx", threads=1)
    np.testing.assert_allclose(single.logits(images), default.logits(images), rtol=0, atol=1e-5)
    with pytest.raises(OracleMnistError, match="threads: must be 1 or more, got 0"):
        Predictor.from_file(onnx_model_file, "onnx", threads=0)


# --- hostile inputs: bounded files, bounded memory, bounded concurrency ------------------------------------


def test_read_image_file_refuses_non_regular_files_before_reading(tmp_path: Path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # with no writer: a plain open() would wait for ever
    with pytest.raises(BadImageError, match=f"^{fifo}: is a FIFO, not a regular file$"):
        read_image_file(fifo, 10_000)
    # A small max_bytes: should the device check ever go, /dev/zero is read to 1 KB, not to the end of memory.
    with pytest.raises(BadImageError, match=r"^/dev/zero: is a device or special file, not a regular file$"):
        read_image_file("/dev/zero", 10_000, max_bytes=1024)
    big = tmp_path / "big.png"
    with open(big, "wb") as fh:
        fh.truncate(10**9)  # sparse: a gigabyte that takes no disk
    with pytest.raises(ImageTooLargeError, match=f"^{big}: file is larger than the limit of 1000 bytes$"):
        read_image_file(big, 10_000, max_bytes=1000)


def test_transparent_images_composite_exactly_like_the_float_formula():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (70, 50, 4), dtype=np.uint8)
    img = Image.fromarray(rgba, "RGBA")
    luma = np.asarray(img.convert("L"), dtype=np.float64)
    alpha = rgba[..., 3] / 255.0
    ground = 255.0 if (luma * alpha).sum() / alpha.sum() < 128 else 0.0
    expected = np.clip(np.rint(luma * alpha + ground * (1 - alpha)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(to_gray(img), expected)


def test_converting_a_large_upload_makes_no_full_size_float_copies(model_file: Path):
    """numpy reports its allocations to tracemalloc: the conversion's own arrays stay near 1 byte per pixel
    (the uint8 planes), where float64 arrays of the whole image would take 8 each."""
    side = 2000
    rgba = np.zeros((side, side, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[side // 4 : side // 2, :, 3] = 128  # partly transparent: the compositing path
    data = encode(Image.fromarray(rgba, "RGBA"))
    predictor = Predictor.from_file(model_file)
    tracemalloc.start()
    try:
        predictor.features_from(data, "big.png", max_pixels=side * side)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * side * side, f"{peak / side / side:.1f} bytes per pixel"


def test_huge_images_queue_in_their_own_lane(model_file: Path, monkeypatch):
    """One heavy slot (1 concurrent pass): while a huge image is being converted, a second huge one waits,
    and an ordinary one does not."""
    predictor = Predictor(*_loaded(model_file), concurrent=1)
    huge = encode(Image.new("L", (1100, 1000)))
    small = encode(Image.new("L", (50, 50)))
    inside, release = threading.Event(), threading.Event()
    active: list[int] = []
    most = [0]
    real_features_of = predictor.features_of

    def features_of(img: Image.Image, name: str) -> np.ndarray:
        if name.startswith("huge"):
            active.append(1)
            most[0] = max(most[0], len(active))
            inside.set()
            release.wait(30)
            active.pop()
        return real_features_of(img, name)

    monkeypatch.setattr(predictor, "features_of", features_of)
    threads = [
        threading.Thread(target=predictor.features_from, args=(huge, f"huge{i}", 2_000_000)) for i in range(3)
    ]
    for t in threads:
        t.start()
    assert inside.wait(30)
    predictor.features_from(small, "small", 2_000_000)
    huge_still_running = not release.is_set() and len(active) == 1
    release.set()
    for t in threads:
        t.join(60)
    assert huge_still_running  # the ordinary image did not wait for the huge one
    assert most[0] == 1  # nor did two huge ones run at once


def _loaded(model_file: Path) -> tuple:
    loaded = Predictor.from_file(model_file)
    return loaded.meta, loaded._run, loaded.backend, loaded.path


# --- broken models ------------------------------------------------------------------------------------------


def test_non_finite_outputs_are_never_probabilities():
    predictor = fixed_predictor(np.array([np.nan] + [0.0] * 9, dtype=np.float32))
    with pytest.raises(ModelOutputError, match=r"^fixed: the model's outputs are not finite"):
        predictor.predict_features(np.zeros((1, 28, 28), dtype=np.uint8))


def test_a_temperature_that_slipped_past_the_load_checks_never_becomes_a_nan_probability():
    predictor = fixed_predictor(np.array([1.0] + [0.0] * 9, dtype=np.float32))
    # As if the metadata had not been checked (ModelMeta refuses such a temperature when it is made).
    object.__setattr__(predictor.meta, "temperature", 5e-324)
    with pytest.raises(ModelOutputError, match=r"^fixed: the model's probabilities are not finite"):
        predictor.predict_features(np.zeros((1, 28, 28), dtype=np.uint8))
    with pytest.raises(ModelOutputError):
        predictor.check_outputs()


def test_a_broken_torch_model_is_refused_at_load(tmp_path: Path, model_file: Path):
    broken = broken_model_copy(model_file, tmp_path / "nan.pt", float("nan"))
    with pytest.raises(OracleMnistError, match=f"^{broken}: weights are not finite"):
        Predictor.from_file(broken)


def _onnx_with(onnx_model_file: Path, dest: Path, nan_weight: bool = False, **meta_changes) -> Path:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_model_file))
    entry = next(e for e in proto.metadata_props if e.key == ONNX_META_KEY)
    entry.value = json.dumps({**json.loads(entry.value), **meta_changes})
    if nan_weight:
        init = next(i for i in proto.graph.initializer if numpy_helper.to_array(i).dtype == np.float32)
        arr = numpy_helper.to_array(init).copy()
        arr.flat[0] = np.nan
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save_model(proto, str(dest))
    return dest


@pytest.mark.parametrize(
    ("nan_weight", "meta", "message"),
    [
        (True, {}, "weights are not finite"),
        (False, {"std": 0.0}, "model metadata: std: must be positive, got 0.0"),
        (False, {"mean": float("nan")}, "model metadata: mean: expected a finite number, got nan"),
    ],
)
def test_a_broken_onnx_model_is_refused_at_load(tmp_path, onnx_model_file, nan_weight, meta, message):
    broken = _onnx_with(onnx_model_file, tmp_path / "broken.onnx", nan_weight, **meta)
    with pytest.raises(OracleMnistError, match=f"^{broken}: {message}"):
        Predictor.from_file(broken, "onnx")
