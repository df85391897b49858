"""DVC stage featurize: prepared splits -> model-ready uint8 arrays at featurize.image_size (auto: the model's
recipe), and the sample grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from oracle_mnist.config import load_params
from oracle_mnist.datasets import SPLITS, convert_scans, load_features, load_manifest, save_features, workers
from oracle_mnist.errors import stage_main
from oracle_mnist.fsutil import atomic_dir, atomic_path
from oracle_mnist.images import convert_batch, sample_grid
from oracle_mnist.models import resolve_recipe

PARAMS = Path("params.yaml")
RAW = Path("data/raw")
PREPARED = Path("data/prepared")
FEATURES = Path("data/features")
SAMPLES_PLOT = Path("plots/samples.png")


@stage_main
def main() -> None:
    params, _ = resolve_recipe(load_params(PARAMS))  # image_size: auto is the model's recipe
    feat = params.featurize
    features: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in SPLITS:
        if params.data.format == "idx":
            images, labels = load_features(PREPARED / f"{split}.npz")
            # The idx images go through the very conversion uploads get: training and serving pixels match.
            features[split] = (convert_batch(images, feat.image_size, workers()), labels)
        else:
            items = load_manifest(PREPARED / f"{split}.json", params.num_classes)
            images = convert_scans(
                [RAW / name for name, _ in items],
                feat.image_size,
                params.data.min_side,
                params.data.max_pixels,
                desc=split,
            )
            features[split] = (images, np.array([label for _, label in items], dtype=np.int64))
    with atomic_dir(FEATURES) as out, atomic_path(SAMPLES_PLOT) as plot:
        for split, (images, labels) in features.items():
            save_features(out / f"{split}.npz", images, labels)
        sample_grid(*features["train"], params.classes).save(plot, format="PNG")


if __name__ == "__main__":
    main()
