"""DVC stage train: features -> models/model.pt (the mean of the last epochs' weights) and dvclive curves.

Runs as `python stages/train.py` or, unchanged, as `torchrun --nproc_per_node=N stages/train.py`.
"""

from __future__ import annotations

import dataclasses
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
from dvclive import Live
from torch import nn

from oracle_mnist import engine, metrics
from oracle_mnist.config import load_params
from oracle_mnist.datasets import load_features
from oracle_mnist.errors import OracleMnistError, stage_main
from oracle_mnist.images import to_tensor
from oracle_mnist.models import ModelMeta, build_model, resolve_recipe, save_model

PARAMS = Path("params.yaml")
FEATURES = Path("data/features")
MODEL = Path("models/model.pt")
LIVE_DIR = Path("dvclive")
# Not a DVC output: DVC deletes outputs before it reruns a stage, and `persist: true` would cost the
# run-cache (treeverse/dvc#10412). Each run's checkpoints sit under a key of its params and data.
CHECKPOINTS = Path("checkpoints/train")

Split = tuple[np.ndarray, np.ndarray]


def log_epoch(live: Live, stats: engine.EpochStats) -> None:
    live.step = stats.epoch
    live.log_metric("train/loss", stats.train_loss)
    live.log_metric("val/loss", stats.val_loss)
    live.log_metric("val/acc", stats.val_acc)
    live.log_metric("lr", stats.lr)
    live.make_summary()


def calibrate(model: nn.Module, val: Split, meta: ModelMeta, device: torch.device) -> float:
    """The kept model's temperature, fitted on the validation split (the test split stays unseen). In fp32
    whatever train.amp says: it calibrates what evaluate and serving compute."""
    logits = engine.predict_logits(model, to_tensor(val[0], meta.mean, meta.std), device).numpy()
    temperature = metrics.fit_temperature(logits, val[1])
    before = metrics.evaluate(logits, val[1], meta.class_names)
    after = metrics.evaluate(logits, val[1], meta.class_names, temperature=temperature)
    print(
        f"temperature {temperature:g} fitted on {len(val[1])} validation images: "
        f"loss {before['loss']:.4f} -> {after['loss']:.4f}, ECE {before['ece']:.4f} -> {after['ece']:.4f}",
        file=sys.stderr,
    )
    return temperature


def log_kept(live: Live, kept: engine.EpochStats) -> None:
    live.log_metric("kept/epoch", kept.epoch, plot=False)
    live.log_metric("kept/val_acc", kept.val_acc, plot=False)
    live.log_metric("kept/val_loss", kept.val_loss, plot=False)
    live.end()


@stage_main
def main() -> None:
    params, recipe = resolve_recipe(load_params(PARAMS))  # epochs, lr: auto are the model's recipe
    cfg = params.train
    train = load_features(FEATURES / "train.npz", params.num_classes)
    val = load_features(FEATURES / "val.npz", params.num_classes)
    size = train[0].shape[1]
    if val[0].shape[1] != size:
        raise OracleMnistError(f"{FEATURES}: train images are {size} px but val images {val[0].shape[1]} px")

    recipe = dataclasses.replace(recipe, image_size=size)  # what the features are, whatever params say
    print(f"recipe for {params.model}: {recipe}", file=sys.stderr)
    info = engine.init_distributed(cfg.device)
    device = engine.select_device(cfg.device, info)
    if device.type == "cpu":
        engine.fix_cpu_threads(cfg.threads)
        if info.is_main:
            print(f"training on CPU with {cfg.threads} threads per process (train.threads)", file=sys.stderr)
    engine.make_deterministic(cfg.seed)
    model = build_model(
        params.model, params.num_classes, size, cfg.pretrained, cfg.weights_file, recipe.network
    )
    precision = engine.precision_name(engine.amp_dtype(device, cfg.amp, model))
    if info.is_main:
        print(f"training {params.model} on {device.type} in {precision} (train.amp)", file=sys.stderr)
    # Normalisation from the training split alone; it travels inside model.pt to evaluate and serving.
    mean, std = float(train[0].mean() / 255.0), float(train[0].std() / 255.0)
    data_hash = engine.digest_arrays(*train, *val)
    # The recipe's network changes, where it has any. A recipe without records none, in the hash and in the model
    # file, as before networks existed: the same run keeps its hash and writes the same file.
    network = {"network": recipe.network} if recipe.network else {}
    params_hash = engine.digest_json(
        {"model": params.model, "classes": params.classes, "train": cfg.model_dump(), **network}
    )
    # The precision too: train.amp gives bfloat16 on one CPU and float32 on another, and a run must not resume
    # in another precision than it started.
    run_key = engine.digest_json([params_hash, data_hash, info.world_size, precision])

    live = Live(str(LIVE_DIR), save_dvc_exp=False, dvcyaml=None) if info.is_main else None
    checkpoints = CHECKPOINTS / run_key[:16]
    result = engine.fit(
        model, train, val, mean, std, cfg, device=device, info=info, checkpoint_dir=checkpoints,
        fingerprint=run_key, on_epoch=partial(log_epoch, live) if live is not None else None,
    )  # fmt: skip
    if live is not None and result.best is not None:
        kept = result.best
        log_kept(live, kept)
        model.load_state_dict(result.state_dict)
        recorded = {k: v for k, v in dataclasses.asdict(recipe).items() if k != "network"} | network
        meta = ModelMeta(
            model_name=params.model,
            class_names=params.classes,
            image_size=size,
            mean=mean,
            std=std,
            data_hash=data_hash,
            params_hash=params_hash,
            metrics={"val_acc": kept.val_acc, "val_loss": kept.val_loss, "train_loss": kept.train_loss},
            epoch=kept.epoch,
            recipe=recorded,
            precision=precision,
        )
        meta = dataclasses.replace(meta, temperature=calibrate(model, val, meta, device))
        save_model(MODEL, model, meta)
        engine.clear_checkpoints(checkpoints)
    engine.close_distributed(info)


if __name__ == "__main__":
    main()
