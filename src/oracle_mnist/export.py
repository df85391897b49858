"""ONNX export of a saved model, with its metadata inside the file, and the parity check against torch."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from oracle_mnist.errors import OracleMnistError
from oracle_mnist.fsutil import atomic_path
from oracle_mnist.inference import ONNX_META_KEY, Predictor
from oracle_mnist.models import ModelMeta

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# Opset 18 is what torch's dynamo exporter targets natively; onnxruntime >= 1.14 runs it.
OPSET = 18
PARITY_TOLERANCE = 1e-4


def export_onnx(model: nn.Module, meta: ModelMeta, path: str | Path) -> None:
    """Write `model` as ONNX (input "images" float32 (batch, 1, S, S), output "logits" (batch, C)), with a
    dynamic batch axis and `meta` as JSON in metadata_props, atomically."""
    model = model.cpu().eval()
    example = torch.zeros(2, 1, meta.image_size, meta.image_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        # The exporter warns about internals (e.g. deprecated torch APIs timm uses) that do not affect the graph.
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                opset_version=OPSET,
                optimize=True,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many internal types; the model name is what helps
            raise OracleMnistError(f"model {meta.model_name!r}: ONNX export failed: {exc}") from exc
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key = ONNX_META_KEY
    entry.value = json.dumps(dataclasses.asdict(meta))
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))


def max_logit_difference(
    torch_predictor: Predictor, onnx_predictor: Predictor, features: np.ndarray
) -> float:
    """Largest absolute difference between the two backends' logits on uint8 (N, S, S) features."""
    if torch_predictor.meta != onnx_predictor.meta:
        raise OracleMnistError(
            f"{onnx_predictor.path}: metadata differs from {torch_predictor.path}; re-export the model"
        )
    a = torch_predictor.logits(features)
    b = onnx_predictor.logits(features)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def check_parity(
    torch_predictor: Predictor,
    onnx_predictor: Predictor,
    features: np.ndarray,
    tolerance: float = PARITY_TOLERANCE,
) -> float:
    """Export parity on real images: the largest logit difference, or an error when it is over `tolerance`."""
    diff = max_logit_difference(torch_predictor, onnx_predictor, features)
    if not diff <= tolerance:
        raise OracleMnistError(
            f"{onnx_predictor.path}: ONNX logits differ from torch by {diff:.3g} (> {tolerance}) on "
            f"{len(features)} images"
        )
    return diff
