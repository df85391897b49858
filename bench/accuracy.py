"""Accuracy of our default recipe against the Oracle-MNIST paper's CNN, trained on the same data.

    python bench/accuracy.py [--sample DIR] [--params params.yaml]

Both read the sample's idx files and split them as the prepare stage does (data.seed, data.val_fraction).
Paper recipe: conv 20@5x5, max-pool, conv 50@5x5, max-pool, fc 500, fc 10; SGD lr 0.1, momentum 0.5,
batch 64, 15 epochs, inputs scaled to [-1, 1], no augmentation, last epoch kept. It trains on train + val
(all 2,000 training images: it selects nothing on validation). Ours: exactly the train stage's code and
params.yaml (features at featurize.image_size, the averaged weights kept), evaluated like the evaluate stage.
Both run on the CPU with the same seed; the table's times are wall-clock training times.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from oracle_mnist import engine, metrics
from oracle_mnist.config import load_params
from oracle_mnist.datasets import read_idx_split, stratified_split
from oracle_mnist.images import convert_batch, to_tensor
from oracle_mnist.models import build_model, resolve_recipe

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def paper_cnn(num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 20, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * 4 * 4, 500),
        nn.ReLU(),
        nn.Linear(500, num_classes),
    )


def train_paper(images: np.ndarray, labels: np.ndarray, num_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = paper_cnn(num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    x = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)
    y = torch.from_numpy(labels).long()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(15):
        for batch in torch.randperm(len(x), generator=gen).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sample", type=Path, default=REPO / "data/sources/oracle-mnist-sample")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    args = parser.parse_args()
    params, recipe = resolve_recipe(load_params(args.params))
    classes = params.num_classes
    images, labels = read_idx_split(
        args.sample / "train-images-idx3-ubyte.gz", args.sample / "train-labels-idx1-ubyte.gz", classes
    )
    test_x, test_y = read_idx_split(
        args.sample / "t10k-images-idx3-ubyte.gz", args.sample / "t10k-labels-idx1-ubyte.gz", classes
    )
    train_idx, val_idx = stratified_split(labels, params.data.val_fraction, params.data.seed)
    rows = []

    start = time.perf_counter()
    paper = train_paper(images, labels, classes, params.train.seed)
    paper_time = time.perf_counter() - start
    with torch.no_grad():
        logits = paper(torch.from_numpy(test_x).float().div(127.5).sub(1).unsqueeze(1)).numpy()
    rows.append(
        ("paper CNN (SGD, 15 epochs, 28 px)", metrics.evaluate(logits, test_y, params.classes), paper_time)
    )

    size = params.featurize.image_size
    ours_x, ours_test = convert_batch(images, size), convert_batch(test_x, size)
    train = (ours_x[train_idx], labels[train_idx])
    val = (ours_x[val_idx], labels[val_idx])
    mean, std = float(train[0].mean() / 255.0), float(train[0].std() / 255.0)
    engine.make_deterministic(params.train.seed)
    model = build_model(params.model, classes, size, network=recipe.network)
    start = time.perf_counter()
    result = engine.fit(model, train, val, mean, std, params.train, device=CPU)
    ours_time = time.perf_counter() - start
    model.load_state_dict(result.state_dict)
    logits = engine.predict_logits(model, to_tensor(ours_test, mean, std), CPU).numpy()
    label = f"ours ({params.model}, {params.train.epochs} epochs, {size} px)"
    rows.append((label, metrics.evaluate(logits, test_y, params.classes), ours_time))

    print(f"\nOracle-MNIST sample: {len(images)} training images, {len(test_x)} test images; CPU threads: "
          f"{torch.get_num_threads()}\n")  # fmt: skip
    print("| recipe | test accuracy | macro-F1 | training time |")
    print("| --- | --- | --- | --- |")
    for name, report, seconds in rows:
        print(f"| {name} | {report['accuracy']:.2%} | {report['macro_f1']:.4f} | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
