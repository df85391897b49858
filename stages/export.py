"""DVC stage export: models/model.pt -> models/model.onnx, checked against torch on the real test images."""

from __future__ import annotations

from pathlib import Path

from oracle_mnist.datasets import load_features
from oracle_mnist.errors import stage_main
from oracle_mnist.export import OPSET, PARITY_TOLERANCE, check_parity, export_onnx
from oracle_mnist.fsutil import atomic_path, write_json
from oracle_mnist.inference import Predictor
from oracle_mnist.models import load_model

MODEL = Path("models/model.pt")
ONNX_MODEL = Path("models/model.onnx")
TEST_FEATURES = Path("data/features/test.npz")
METRICS = Path("metrics/export.json")


@stage_main
def main() -> None:
    model, meta = load_model(MODEL)
    images, _ = load_features(TEST_FEATURES)
    # The ONNX file takes its place only once it has passed the parity check.
    with atomic_path(ONNX_MODEL) as tmp:
        export_onnx(model, meta, tmp)
        diff = check_parity(
            Predictor.from_file(MODEL, "torch"), Predictor.from_file(tmp, "onnx"), images, name=ONNX_MODEL
        )
    write_json(
        METRICS,
        {"max_abs_logit_diff": diff, "tolerance": PARITY_TOLERANCE, "images": len(images), "opset": OPSET},
    )
    print(f"{ONNX_MODEL}: max |logit difference| vs torch {diff:.2e} on {len(images)} test images")


if __name__ == "__main__":
    main()
