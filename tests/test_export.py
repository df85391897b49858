"""ONNX export: metadata inside the file, a dynamic batch axis, parity with torch on real images, the stage."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import REPO, run

from oracle_mnist.datasets import save_features
from oracle_mnist.errors import OracleMnistError
from oracle_mnist.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    PARITY_TOLERANCE,
    check_parity,
    logit_differences,
)
from oracle_mnist.inference import ONNX_META_KEY, Predictor


def test_onnx_file_carries_the_model_metadata_and_a_dynamic_batch(
    onnx_model_file: Path, calibrated_model_file: Path
):
    proto = onnx.load(str(onnx_model_file))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props[ONNX_META_KEY])
    torch_meta = Predictor.from_file(calibrated_model_file).meta
    assert meta["model_name"] == "resnet18"
    assert tuple(meta["class_names"]) == torch_meta.class_names
    assert (meta["mean"], meta["std"], meta["data_hash"]) == (
        torch_meta.mean,
        torch_meta.std,
        "test-data-hash",
    )
    (inp,) = proto.graph.input
    (out,) = proto.graph.output
    assert (inp.name, out.name) == (INPUT_NAME, OUTPUT_NAME)
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic: any batch size
    assert [d.dim_value for d in dims[1:]] == [1, 28, 28]


def test_onnx_bytes_name_no_path_of_this_machine(onnx_model_file: Path):
    """The exporter records a stack trace per node with the absolute paths of torch's and timm's sources: an
    install anywhere else (a venv, another Python) exported other bytes, and dvc.lock changed on every clone."""
    import timm

    raw = onnx_model_file.read_bytes()
    for package in (torch, timm):
        assert str(Path(package.__file__).parent.parent).encode() not in raw
    # What is left of the exporter's node metadata depends on the code alone, and still says where a node
    # comes from (the module scopes that Netron shows).
    keys = {entry.key for node in onnx.load(str(onnx_model_file)).graph.node for entry in node.metadata_props}
    assert "pkg.torch.onnx.stack_trace" not in keys and "pkg.torch.onnx.name_scopes" in keys


def test_parity_with_torch_on_all_real_sample_test_images(
    calibrated_model_file, onnx_model_file, sample_test_images
):
    images, _ = sample_test_images
    diff = check_parity(
        Predictor.from_file(calibrated_model_file, "torch"),
        Predictor.from_file(onnx_model_file, "onnx"),
        images,
    )
    assert 0 <= diff <= PARITY_TOLERANCE


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_any_batch_size_runs(
    onnx_model_file: Path, calibrated_model_file: Path, sample_test_images, batch: int
):
    images = sample_test_images[0][:batch]
    onnx_logits = Predictor.from_file(onnx_model_file, "onnx").logits(images)
    assert onnx_logits.shape == (batch, 10)
    np.testing.assert_allclose(
        onnx_logits, Predictor.from_file(calibrated_model_file).logits(images), rtol=0, atol=PARITY_TOLERANCE
    )


def test_parity_check_fails_on_a_difference_over_the_tolerance(model_file: Path, sample_test_images):
    images = sample_test_images[0][:8]
    reference = Predictor.from_file(model_file)
    run = reference._run

    def fake(logits_of, name: str = "other.onnx") -> Predictor:
        return Predictor(reference.meta, logits_of, "onnx", Path(name))

    # Logits within +-0.5 (a scale of 1): the tolerance is absolute.
    small = fake(lambda batch: 0.5 * np.tanh(run(batch)))
    shifted = fake(lambda batch: 0.5 * np.tanh(run(batch)) + 2e-4, "shifted.onnx")
    assert logit_differences(small, shifted, images) == pytest.approx((2e-4, 2e-4), rel=0.05)
    with pytest.raises(
        OracleMnistError,
        match=r"shifted.onnx: ONNX logits differ from torch by 0.0002 of the logits' scale \(> 0.0001; "
        r"0.0002 absolute\) on 8 images",
    ):
        check_parity(small, shifted, images)
    with pytest.raises(OracleMnistError, match=r"^models/model.onnx: ONNX logits differ"):
        check_parity(small, shifted, images, name=Path("models/model.onnx"))

    # Each image's largest |logit| 200 (a barely trained network's scale): float32 rounding there is ~1e-5
    # absolute, so 2e-3 passes and 0.05 (2.5e-4 of the scale) does not.
    def big(batch):
        logits = run(batch).astype(np.float64)
        return 200 * logits / np.abs(logits).max(axis=1, keepdims=True)

    reference_big = fake(big)
    assert check_parity(reference_big, fake(lambda b: big(b) + 2e-3), images) == pytest.approx(2e-3, rel=1e-6)
    with pytest.raises(
        OracleMnistError, match=r"by 0.00025 of the logits' scale \(> 0.0001; 0.05 absolute\)"
    ):
        check_parity(reference_big, fake(lambda b: big(b) + 0.05), images)

    stale = Predictor(dataclasses.replace(reference.meta, epoch=99), run, "onnx", Path("s.onnx"))
    with pytest.raises(OracleMnistError, match=r"s\.onnx: metadata differs"):
        check_parity(reference, stale, images)


def test_the_temperature_round_trips_through_onnx_and_calibrates_its_probabilities(
    calibrated_model_file: Path, onnx_model_file: Path, tmp_path: Path, sample_test_images
):
    by_onnx = Predictor.from_file(onnx_model_file, "onnx")
    by_torch = Predictor.from_file(calibrated_model_file, "torch")
    assert by_onnx.meta == by_torch.meta and by_onnx.meta.temperature == 2.0
    images = sample_test_images[0][:16]
    logits = by_onnx.logits(images).astype(np.float64) / 2.0
    want = np.exp(logits - logits.max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    got = by_onnx.predict_features(images)
    assert [p.probability for p in got] == pytest.approx(want.max(axis=1).tolist(), rel=1e-6)
    assert [p.probability for p in got] == pytest.approx(
        [p.probability for p in by_torch.predict_features(images)], abs=1e-4
    )

    # An ONNX file exported before the temperature existed serves the plain softmax, as it always did.
    proto = onnx.load(str(onnx_model_file))
    (entry,) = [p for p in proto.metadata_props if p.key == ONNX_META_KEY]
    entry.value = json.dumps({k: v for k, v in json.loads(entry.value).items() if k != "temperature"})
    onnx.save_model(proto, str(tmp_path / "old.onnx"))
    assert Predictor.from_file(tmp_path / "old.onnx", "onnx").meta.temperature == 1.0


@pytest.mark.slow  # an ONNX export: 4 s
def test_a_network_changed_by_its_recipe_exports_and_serves_alike(
    model_file: Path, tmp_path: Path, sample_test_images
):
    """ConvNeXt's recipe changes the network (models.RECIPES["convnext"]): torch and ONNX serving both get the
    network the file records, not timm's default one."""
    import torch

    from oracle_mnist.export import export_onnx
    from oracle_mnist.images import convert_batch
    from oracle_mnist.models import RECIPES, build_model, load_model, save_model

    recipe = RECIPES["convnext"]
    torch.manual_seed(0)
    model = build_model("test_convnext", 10, 32, network=recipe.network).eval()  # 32 px: ConvNeXt's least
    meta = dataclasses.replace(
        Predictor.from_file(model_file).meta,
        model_name="test_convnext",
        image_size=32,
        recipe=dataclasses.asdict(recipe),
    )
    save_model(tmp_path / "model.pt", model, meta)
    export_onnx(*load_model(tmp_path / "model.pt"), tmp_path / "model.onnx")

    by_torch = Predictor.from_file(tmp_path / "model.pt", "torch")
    by_onnx = Predictor.from_file(tmp_path / "model.onnx", "onnx")
    assert by_onnx.meta == by_torch.meta and by_onnx.meta.recipe["network"] == recipe.network
    images = convert_batch(sample_test_images[0][:32], 32)
    assert 0 <= check_parity(by_torch, by_onnx, images) <= PARITY_TOLERANCE


@pytest.mark.slow
def test_export_stage_writes_the_onnx_model_and_its_parity(
    tmp_path: Path, model_file: Path, sample_test_images
):
    images, labels = sample_test_images
    (tmp_path / "models").mkdir()
    (tmp_path / "models/model.pt").write_bytes(model_file.read_bytes())
    save_features(tmp_path / "data/features/test.npz", images, labels)
    proc = run([sys.executable, str(REPO / "stages/export.py")], cwd=tmp_path, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "metrics/export.json").read_text())
    assert report["images"] == 400
    assert report["max_abs_logit_diff"] <= PARITY_TOLERANCE
    assert f"{report['max_abs_logit_diff']:.2e} on 400 test images" in proc.stdout
    np.testing.assert_allclose(
        Predictor.from_file(tmp_path / "models/model.onnx", "onnx").logits(images[:5]),
        Predictor.from_file(model_file).logits(images[:5]),
        rtol=0,
        atol=PARITY_TOLERANCE,
    )
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model.onnx", "model.pt"]


@pytest.mark.slow
def test_export_stage_fails_cleanly_without_a_model(tmp_path: Path):
    proc = run([sys.executable, str(REPO / "stages/export.py")], cwd=tmp_path, check=False, timeout=300)
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        == "error: models/model.pt: model file not found (run `dvc repro train` or `dvc pull`)"
    )
    assert not (tmp_path / "models/model.onnx").exists()
