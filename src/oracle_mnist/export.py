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
# Per image, of its largest |logit| where that is over 1: float32 rounding grows with the values summed, so a
# barely trained network (logits in the hundreds) differs by 1e-4 absolute with nothing wrong. A broken export
# differs by far more than that on any scale.
PARITY_TOLERANCE = 1e-4
# Node metadata the dynamo exporter writes that names source files by absolute path (torch's and timm's, in
# this machine's site-packages): the same weights exported from another install location would differ in
# bytes, and dvc.lock with them. Everything else it records (module names, scopes) depends on the code alone.
MACHINE_METADATA = ("pkg.torch.onnx.stack_trace",)


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
    _drop_machine_metadata(proto)
    entry = proto.metadata_props.add()
    entry.key = ONNX_META_KEY
    entry.value = json.dumps(dataclasses.asdict(meta))
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))


def _drop_machine_metadata(proto: onnx.ModelProto) -> None:
    """Remove MACHINE_METADATA from every node, in the graph, its subgraphs and its functions."""
    graphs = [proto.graph, *(function for function in proto.functions)]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            kept = [entry for entry in node.metadata_props if entry.key not in MACHINE_METADATA]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
            graphs.extend(attr.g for attr in node.attribute if attr.HasField("g"))
            graphs.extend(sub for attr in node.attribute for sub in attr.graphs)


def logit_differences(
    torch_predictor: Predictor, onnx_predictor: Predictor, features: np.ndarray
) -> tuple[float, float]:
    """The two backends' logits on uint8 (N, S, S) features: their largest absolute difference, and their
    largest difference relative to its image's logit scale (its largest |logit|, at least 1)."""
    if torch_predictor.meta != onnx_predictor.meta:
        raise OracleMnistError(
            f"{onnx_predictor.path}: metadata differs from {torch_predictor.path}; re-export the model"
        )
    a = torch_predictor.logits(features).astype(np.float64)
    b = onnx_predictor.logits(features).astype(np.float64)
    per_image = np.abs(a - b).max(axis=1)
    scale = np.maximum(1.0, np.abs(a).max(axis=1))
    return float(per_image.max()), float((per_image / scale).max())


def check_parity(
    torch_predictor: Predictor,
    onnx_predictor: Predictor,
    features: np.ndarray,
    tolerance: float = PARITY_TOLERANCE,
    name: str | Path | None = None,
) -> float:
    """Export parity on real images: the largest absolute logit difference, or an error when a difference is
    over `tolerance` relative to its image's logit scale. `name`: the ONNX file's name in that error
    (default: the predictor's path)."""
    absolute, relative = logit_differences(torch_predictor, onnx_predictor, features)
    if not relative <= tolerance:
        raise OracleMnistError(
            f"{name or onnx_predictor.path}: ONNX logits differ from torch by {relative:.3g} of the logits' "
            f"scale (> {tolerance}; {absolute:.3g} absolute) on {len(features)} images"
        )
    return absolute
