"""How far a model's test ECE is from what a perfectly calibrated model would measure on the same images.

    python bench/calibration.py                       # models/model.pt on data/features/test.npz
    python bench/calibration.py --model other.pt --draws 5000

ECE on a few hundred images is not 0 even for perfect probabilities: each confidence bin's accuracy is a
count of a few dozen right or wrong answers. This prints the model's ECE (the evaluate stage's bins) beside
the ECE a perfectly calibrated model with exactly these confidences measures (each answer drawn right with
probability equal to its confidence), for the plain softmax and for the model's temperature. Where a
perfectly calibrated model often measures as much, the test split cannot tell what miscalibration is left
from noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from oracle_mnist import engine, metrics
from oracle_mnist.config import load_params
from oracle_mnist.datasets import load_features
from oracle_mnist.images import to_tensor
from oracle_mnist.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"))
    parser.add_argument("--features", type=Path, default=Path("data/features/test.npz"))
    parser.add_argument("--draws", type=int, default=2000)
    args = parser.parse_args()
    bins = load_params(Path("params.yaml")).evaluate.ece_bins
    cpu = torch.device("cpu")
    model, meta = load_model(args.model, cpu)
    images, labels = load_features(args.features, len(meta.class_names))
    logits = engine.predict_logits(model, to_tensor(images, meta.mean, meta.std), cpu).numpy()
    print(f"{args.model} on {args.features}: {len(labels)} images, {bins} bins, {args.draws} draws")
    rng = np.random.default_rng(0)
    for name, temperature in (
        ("plain softmax", 1.0),
        (f"temperature {meta.temperature:g}", meta.temperature),
    ):
        probs = metrics.softmax(logits, temperature)
        confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
        measured = metrics.calibration_error(confidence, correct, bins)
        ideal = np.array(
            [
                metrics.calibration_error(confidence, rng.random(len(labels)) < confidence, bins)
                for _ in range(args.draws)
            ]
        )
        print(
            f"  {name:<22} ECE {measured:.3f}   perfectly calibrated: {ideal.mean():.3f} "
            f"(5-95% {np.percentile(ideal, 5):.3f}-{np.percentile(ideal, 95):.3f}), "
            f"{(ideal >= measured).mean():.0%} of draws at or above {measured:.3f}"
        )


if __name__ == "__main__":
    main()
