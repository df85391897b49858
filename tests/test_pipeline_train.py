"""train/evaluate end to end with dvc, in temporary copies of the repository on the real sample (shrunken
by TEST_PARAMS): outputs and plots, exact stage dependencies, run-cache, resume after kill -9, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import REPO, TEST_PARAMS, dvc, run, write_params
from PIL import Image

from oracle_mnist import engine
from oracle_mnist.config import load_params
from oracle_mnist.datasets import load_features
from oracle_mnist.images import to_tensor
from oracle_mnist.models import RECIPES, load_model

# dvc repro, kill -9 and torchrun runs: the full suite's, not the edit loop's.
pytestmark = pytest.mark.slow

OUTPUTS = ("models/model.pt", "dvclive/metrics.json", "dvclive/plots/metrics/train/loss.tsv",
           "dvclive/plots/metrics/val/acc.tsv", "dvclive/plots/metrics/val/loss.tsv",
           "dvclive/plots/metrics/lr.tsv")  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_process():
    # Stages inherit this: on a busy 2-core machine OpenMP oversubscription made shrunken training 5x slower.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


def _outputs(repo: Path) -> dict[str, bytes]:
    return {name: (repo / name).read_bytes() for name in OUTPUTS}


def test_repro_writes_self_contained_model_metrics_and_curves(pipeline: Path):
    params = load_params(pipeline / "params.yaml")
    _, meta = load_model(pipeline / "models/model.pt")
    train = load_features(pipeline / "data/features/train.npz")
    val = load_features(pipeline / "data/features/val.npz")
    assert meta.model_name == params.model
    assert meta.class_names == params.classes
    assert meta.image_size == train[0].shape[1] == 28
    assert meta.data_hash == engine.digest_arrays(*train, *val)
    assert meta.mean == pytest.approx(train[0].mean() / 255) and meta.std == pytest.approx(
        train[0].std() / 255
    )
    assert len(meta.params_hash) == 64 and meta.epoch == 2  # the shrunken run's 2 epochs, averaged
    # A recipe that leaves the network as timm builds it records none: such files are what they were before.
    assert meta.recipe and "network" not in meta.recipe

    live = json.loads((pipeline / "dvclive/metrics.json").read_text())
    assert set(live) >= {"train", "val", "lr", "step", "kept"}
    assert live["kept"]["epoch"] == meta.epoch and live["kept"]["val_acc"] == meta.metrics["val_acc"]
    rows = (pipeline / "dvclive/plots/metrics/val/acc.tsv").read_text().splitlines()
    assert rows[0] == "step\tacc" and [r.split("\t")[0] for r in rows[1:]] == ["1", "2"]
    assert not (pipeline / "checkpoints/train").exists() or not any(
        (pipeline / "checkpoints/train").iterdir()
    )


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    scaled = logits.astype(np.float64) / temperature
    top = scaled.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1))
    return float((log_z - scaled[np.arange(len(labels)), labels]).mean())


def test_train_stores_the_temperature_fitted_on_the_validation_split(pipeline: Path):
    model, meta = load_model(pipeline / "models/model.pt")
    images, labels = load_features(pipeline / "data/features/val.npz")
    logits = engine.predict_logits(model, to_tensor(images, meta.mean, meta.std), torch.device("cpu")).numpy()
    t = meta.temperature
    assert t != 1.0
    # The validation loss is at its minimum there: lower than the plain softmax's and than either side's.
    assert _nll(logits, labels, t) < _nll(logits, labels, 1.0)
    assert _nll(logits, labels, t) <= min(_nll(logits, labels, t * 1.02), _nll(logits, labels, t / 1.02))


def test_evaluate_metrics_and_plots_cover_the_test_split(pipeline: Path):
    report = json.loads((pipeline / "metrics/evaluate.json").read_text())
    # Only headline numbers are metrics (each is a `dvc exp show` column); per-class scores have their own file.
    scores = {"accuracy", "macro_f1", "top2_accuracy", "loss", "ece", "ece_uncalibrated"}
    # ... and the numbers in force, auto resolved: the shrunken config's size and epochs, the recipe's lr.
    assert set(report) == scores | {"image_size", "epochs", "lr"}
    assert (report["image_size"], report["epochs"], report["lr"]) == (28, 2, 0.002)
    # The recipe in words and the precision live beside them, not as metric columns.
    recipe = json.loads((pipeline / "metrics/recipe.json").read_text())
    assert (
        recipe["recipe"]
        == "dense: 28 px, 2 epochs, lr 0.002, CutMix 0.5, label smoothing 0.2, mean of the last 2"
    )
    # train.amp's choice for this CPU, as recorded in the model file.
    model, meta = load_model(pipeline / "models/model.pt")
    chosen = engine.amp_dtype(torch.device("cpu"), True, model)
    assert recipe["precision"] == meta.precision == engine.precision_name(chosen)
    assert 0 <= report["accuracy"] <= report["top2_accuracy"] <= 1 and report["loss"] > 0
    report["per_class"] = json.loads((pipeline / "metrics/per_class.json").read_text())
    assert sum(c["support"] for c in report["per_class"].values()) == 400
    assert set(next(iter(report["per_class"].values()))) == {"precision", "recall", "f1", "support"}

    confusion = json.loads((pipeline / "plots/confusion.json").read_text())
    assert len(confusion) == 400  # every test image counted once
    assert Counter(r["actual"] for r in confusion) == dict.fromkeys(report["per_class"], 40)
    accuracy = sum(r["actual"] == r["predicted"] for r in confusion) / 400
    assert accuracy == pytest.approx(report["accuracy"], abs=1e-6)
    per_class = json.loads((pipeline / "plots/per_class_accuracy.json").read_text())
    assert [r["class"] for r in per_class] == list(report["per_class"])
    assert [r["accuracy"] for r in per_class] == [c["recall"] for c in report["per_class"].values()]
    with Image.open(pipeline / "plots/misclassified.png") as img:
        assert img.format == "PNG" and img.size[0] > 100

    # The reliability diagram's points: every test image in one bin of each series, and the ECE they imply
    # (the bins' |accuracy - confidence| weighted by their share) is the one reported, before and after.
    for series, ece in (("uncalibrated", "ece_uncalibrated"), ("calibrated", "ece")):
        rows = json.loads((pipeline / f"plots/reliability_{series}.json").read_text())
        assert {r["probabilities"] for r in rows} == {series}
        assert sum(r["images"] for r in rows) == 400
        assert all(0 < r["confidence"] <= 1 and 0 <= r["accuracy"] <= 1 for r in rows)
        implied = sum(r["images"] / 400 * abs(r["accuracy"] - r["confidence"]) for r in rows)
        assert implied == pytest.approx(report[ece], abs=1e-5)
    assert report["ece"] != report["ece_uncalibrated"]


def test_dvc_plots_show_renders_every_declared_plot(pipeline: Path):
    shown = json.loads(dvc(pipeline, "plots", "show", "--json").stdout)["data"]
    assert {"Confusion matrix", "Confusion matrix (normalised)", "Per-class test accuracy",
            "plots/misclassified.png", "dvclive/plots/metrics/val/acc.tsv"} <= set(shown)  # fmt: skip
    confusion = shown["Confusion matrix"][0]["content"]
    assert len(confusion["data"]["values"]) == 400
    assert '"actual"' in json.dumps(confusion) and '"predicted"' in json.dumps(confusion)
    curve = shown["dvclive/plots/metrics/val/acc.tsv"][0]["content"]
    assert curve["encoding"]["x"]["field"] == "step"
    reliability = shown["Reliability (test)"][0]["content"]
    points = reliability["data"]["values"]
    assert {p["probabilities"] for p in points} == {"uncalibrated", "calibrated"}
    files = {
        name: json.loads((pipeline / name).read_text())
        for name in ("plots/reliability_uncalibrated.json", "plots/reliability_calibrated.json")
    }
    assert len(points) == sum(len(rows) for rows in files.values())
    assert '"confidence"' in json.dumps(reliability) and '"accuracy"' in json.dumps(reliability)


def test_experiment_table_fits_a_wide_terminal(pipeline: Path):
    import csv
    import io

    import yaml

    header = next(csv.reader(io.StringIO(dvc(pipeline, "exp", "show", "--csv").stdout)))
    assert "accuracy" in header and "macro_f1" in header and "model" in header
    assert header.index("accuracy") < header.index("model") < 15
    # The shrunken test params add keys the committed params.yaml leaves to config.py's defaults.
    committed = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    added = [
        f"{group}.{key}" for group, keys in TEST_PARAMS.items() for key in keys if key not in committed[group]
    ]
    assert len(header) - len(added) <= 32, header


def _experiments(node: Any) -> list[dict[str, Any]]:
    """Every `data` record with params in `dvc exp show --json` output, however deeply nested."""
    found = []
    if isinstance(node, dict):
        if "params" in node and "metrics" in node:
            found.append(node)
        for value in node.values():
            found += _experiments(value)
    elif isinstance(node, list):
        for value in node:
            found += _experiments(value)
    return found


def test_changing_model_reruns_from_featurize_and_records_the_recipe(clone: Path):
    """featurize depends on `model` (image_size: auto is the model's recipe); prepare does not. Up to evaluate
    only: export's own test covers it, and the suite's time budget is tight."""
    out = dvc(clone, "exp", "run", "evaluate", "-S", "model=mobilenetv3_small_100").stdout
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'featurize'" in out
    assert "Running stage 'prepare'" not in out and "Stage 'prepare' didn't change" in out
    assert load_model(clone / "models/model.pt")[1].model_name == "mobilenetv3_small_100"

    records = _experiments(json.loads(dvc(clone, "exp", "show", "--json").stdout))
    models = {r["params"]["params.yaml"]["data"]["model"] for r in records}
    assert "mobilenetv3_small_100" in models
    exp = next(r for r in records if r["params"]["params.yaml"]["data"]["model"] == "mobilenetv3_small_100")
    scores = exp["metrics"]["metrics/evaluate.json"]["data"]
    assert "accuracy" in scores
    # The shrunken config sets size and epochs; the learning rate is auto, so the depthwise recipe's.
    assert (scores["image_size"], scores["epochs"], scores["lr"]) == (28, 2, RECIPES["depthwise"].lr)
    assert json.loads((clone / "metrics/recipe.json").read_text())["recipe"] == (
        f"depthwise: 28 px, 2 epochs, lr {RECIPES['depthwise'].lr:g}, label smoothing 0.1, mean of the last 2"
    )
    # The experiment table stays narrow: training curves and per-class scores are not metric columns.
    assert set(exp["metrics"]) == {"metrics/evaluate.json"}


def test_kill_9_mid_training_then_rerun_resumes_to_identical_outputs(pipeline: Path, clone: Path):
    uninterrupted = _outputs(pipeline)  # the same params, trained without a break

    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "-f", "train"],
        cwd=clone, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(clone.glob("checkpoints/train/*/epoch-0001.pt")):
        assert proc.poll() is None, "training finished before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint of epoch 1 appeared"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (clone / "models/model.pt").exists()  # killed before the end: DVC had removed the outputs

    resumed = dvc(clone, "repro", "-f", "train")
    assert "resuming from" in resumed.stderr and "(epoch 1 of 2)" in resumed.stderr
    assert _outputs(clone) == uninterrupted  # byte for byte: weights, metrics and curves
    assert not list(clone.glob("checkpoints/train/*/*.pt"))


def test_torchrun_two_gloo_processes_stay_close_to_single_process(clone: Path):
    single = json.loads((clone / "dvclive/metrics.json").read_text())
    single_meta = load_model(clone / "models/model.pt")[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "stages/train.py",
    ]
    proc = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((clone / "dvclive/metrics.json").read_text())
    meta = load_model(clone / "models/model.pt")[1]
    assert (meta.params_hash, meta.data_hash) == (single_meta.params_hash, single_meta.data_hash)
    # Same batches and augmentation; only BatchNorm sees 16 images per process instead of 32 (gloo has no
    # SyncBatchNorm), so losses agree closely but not bitwise (measured here: 0.03 apart after 2 epochs).
    np.testing.assert_allclose(ddp["train"]["loss"], single["train"]["loss"], atol=0.1)
    np.testing.assert_allclose(ddp["val"]["loss"], single["val"]["loss"], atol=0.1)
    assert not list(clone.glob("checkpoints/train/*/*.pt"))


def test_a_model_without_a_recipe_fails_at_once_saying_what_to_set(clone: Path):
    """At stage level (exit 1, one error line); the size a model needs is build_model's, tested in test_models."""
    write_params(clone, {"model": "edgenext_xx_small"})  # train.lr: auto, and no recipe suits EdgeNeXt
    proc = run([sys.executable, "stages/train.py"], cwd=clone, check=False, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: model 'edgenext_xx_small': no recipe trains this kind of network" in proc.stderr
    assert "set featurize.image_size, train.epochs and train.lr yourself" in proc.stderr
