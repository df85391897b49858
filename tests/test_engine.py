"""engine.py: schedule, augmentation, bitwise determinism, resume after an interruption, DDP equivalence."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tqdm import tqdm

from oracle_mnist import engine
from oracle_mnist.config import AugmentConfig, TrainConfig
from oracle_mnist.datasets import read_idx_split
from oracle_mnist.errors import OracleMnistError
from oracle_mnist.images import to_tensor
from oracle_mnist.models import PRECISIONS, build_model

CPU = torch.device("cpu")
# timm's own test ResNet (0.4 M weights, BatchNorm, the layer names of resnet10t): the training loop is under
# test here, not a network, and it fits 5x faster than resnet10t.
NET = "test_resnet"
TINY = TrainConfig(
    epochs=3,
    lr=0.002,
    warmup_epochs=1,
    batch_size=32,
    batches_per_epoch=3,
    seed=7,
    augment=AugmentConfig(cutmix=0.5),
    average_epochs=3,  # all of them
    label_smoothing=0.1,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a busy 2-core machine OpenMP oversubscription made these tiny fits 5x slower; results are still
    # compared within one thread setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sample(sample_dir: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    images, labels = read_idx_split(
        sample_dir / "train-images-idx3-ubyte.gz", sample_dir / "train-labels-idx1-ubyte.gz", 10
    )
    return (images[:256], labels[:256]), (images[256:320], labels[256:320])


def _fit(sample, cfg: TrainConfig = TINY, **kwargs) -> engine.FitResult:
    engine.make_deterministic(cfg.seed)
    model = build_model(NET, 10, 28)
    return engine.fit(model, *sample, 0.2, 0.3, cfg, device=CPU, **kwargs)


@pytest.fixture(scope="module")
def reference(sample) -> engine.FitResult:
    """One uninterrupted run of TINY, for the determinism and resume tests to compare against."""
    return _fit(sample)


def test_lr_factor_warms_up_linearly_then_follows_cosine_to_min():
    assert engine.lr_factor(0, 10, 110, 0.01) == pytest.approx(0.1)
    assert engine.lr_factor(9, 10, 110, 0.01) == pytest.approx(1.0)
    assert engine.lr_factor(60, 10, 110, 0.01) == pytest.approx(0.01 + 0.99 * 0.5)
    assert engine.lr_factor(110, 10, 110, 0.01) == pytest.approx(0.01)
    assert engine.lr_factor(0, 0, 10, 0.0) == pytest.approx(1.0)


def _gens(seed: int) -> tuple[torch.Generator, torch.Generator]:
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)


def _only(**moves: float) -> engine.Augmenter:
    """An augmenter doing only `moves` (every other kind off), on a background of -1."""
    off = dict(rotate=0, translate=0, scale=0, shear=0, elastic=0, erase_prob=0, erase_max_area=0, cutmix=0)
    return engine.Augmenter(AugmentConfig(**(off | moves)), background=-1.0)


def test_augmenter_without_moves_is_identity_and_fills_with_background():
    x = torch.rand(4, 1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    off = _only()
    torch.testing.assert_close(off.apply(x, off.draw(4, gen, gen)), x, atol=1e-5, rtol=0)

    # A pure shift moves content out at one edge and brings background, not zeros, in at the other.
    shift = _only(translate=0.25)
    out = shift.apply(torch.full((64, 1, 28, 28), 3.0), shift.draw(64, gen, gen))
    assert (out == -1.0).any() and out.min() >= -1.0 - 1e-5

    erase = _only(erase_prob=1.0, erase_max_area=0.15)
    out = erase.apply(torch.full((8, 1, 28, 28), 3.0), erase.draw(8, gen, gen))
    erased = (out == -1.0).float().mean(dim=(1, 2, 3))
    assert ((erased > 0) & (erased <= 0.2)).all()


def test_elastic_bending_moves_a_stroke_by_at_most_its_bound():
    # A vertical stroke in the middle of a 64 px image: bending moves its pixels sideways by at most
    # elastic * side (3.2 px here), and keeps it in one piece.
    x = torch.full((32, 1, 64, 64), -1.0)
    x[:, :, 8:56, 31:33] = 1.0
    bend = _only(elastic=0.05)
    out = bend.apply(x, bend.draw(32, *_gens(0)))
    assert not torch.allclose(out, x, atol=0.1)
    ink_cols = (out[:, 0, 8:56] > 0).nonzero()[:, 2]
    assert ink_cols.min() >= 31 - 3.2 - 1 and ink_cols.max() <= 32 + 3.2 + 1
    assert ((out[:, 0, 12:52] > 0).any(dim=2)).all()  # every inner row still has ink
    assert out.min() >= -1.0 - 1e-5  # the background comes in, never anything darker


def test_cutmix_pastes_a_square_of_the_partner_and_shares_the_label_by_area():
    n = 32
    # Each image one flat value (its index), so every pixel says whose it is.
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 28, 28).contiguous()
    aug = _only(cutmix=1.0)
    draw = aug.draw(n, *_gens(0))
    mixed, own = aug.mix(x, x[draw.partner], draw)
    for i, mate in enumerate(draw.partner.tolist()):
        if mate == i:
            continue
        assert set(mixed[i].unique().tolist()) <= {float(i), float(mate)}
        pasted = (mixed[i, 0] == mate).nonzero()
        if len(pasted):
            (y0, x0), (y1, x1) = pasted.min(0).values, pasted.max(0).values
            assert len(pasted) == (y1 - y0 + 1) * (x1 - x0 + 1)  # one rectangle
        assert own[i].item() == pytest.approx(1 - len(pasted) / 28**2)
    assert own.min() < 0.5 and own.max() <= 1.0

    # Off, nothing is pasted and each image is wholly its own.
    off = _only()
    mixed, own = off.mix(x, x[draw.partner], off.draw(n, *_gens(0)))
    assert torch.equal(mixed, x) and (own == 1).all()


def test_augmenter_draws_depend_on_seed_only():
    aug = engine.Augmenter(AugmentConfig(cutmix=0.0), background=0.0)
    first = aug.draw(16, *_gens(3))
    again = aug.draw(16, *_gens(3))
    assert all(torch.equal(getattr(first, f.name), getattr(again, f.name)) for f in fields(engine.Draw))
    # Never mirrored: the affine part keeps a positive determinant.
    assert (torch.linalg.det(first.theta[:, :, :2]) > 0).all()
    # CutMix has a generator of its own: switching it on changes none of the other draws.
    mixing = engine.Augmenter(AugmentConfig(cutmix=1.0), background=0.0).draw(16, *_gens(3))
    assert mixing.paste.any() and not torch.equal(mixing.paste, first.paste)
    assert all(torch.equal(getattr(mixing, k), getattr(first, k)) for k in ("theta", "erase", "bend"))


def test_fit_is_bitwise_deterministic(sample, reference):
    first, second = reference, _fit(sample)
    assert first.history == second.history
    assert first.state_dict.keys() == second.state_dict.keys()
    assert all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)
    assert len(first.history) == 3
    assert first.history[-1].lr == pytest.approx(TINY.min_lr)
    assert first.history[0].train_loss != first.history[1].train_loss


def test_fit_keeps_the_mean_of_the_last_epochs_with_batchnorm_measured_for_it(sample):
    engine.make_deterministic(TINY.seed)
    model = build_model(NET, 10, 28)
    at_end: dict[int, dict[str, torch.Tensor]] = {}

    def grab(stats: engine.EpochStats) -> None:
        at_end[stats.epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    cfg = TINY.model_copy(update={"average_epochs": 2})
    result = engine.fit(model, *sample, 0.2, 0.3, cfg, device=CPU, on_epoch=grab)
    for name in ("conv1.0.weight", "fc.weight", "bn1.weight"):
        torch.testing.assert_close(result.state_dict[name], (at_end[2][name] + at_end[3][name]) / 2)
    assert not torch.equal(result.state_dict["fc.weight"], at_end[3]["fc.weight"])
    # BatchNorm's statistics are the averaged network's own, not any epoch's nor their mean.
    running = result.state_dict["bn1.running_mean"]
    for weights in (at_end[2], at_end[3]):
        assert not torch.allclose(running, weights["bn1.running_mean"], atol=1e-4)
    # The numbers reported are the kept weights' own.
    assert result.best is not None and result.best.epoch == 3
    model.load_state_dict(result.state_dict)
    val_x = to_tensor(sample[1][0], 0.2, 0.3)
    val_acc = (engine.predict_logits(model, val_x, CPU).argmax(1).numpy() == sample[1][1]).mean()
    assert result.best.val_acc == pytest.approx(val_acc)


def test_fit_without_averaging_keeps_the_best_epoch(sample):
    result = _fit(sample, TINY.model_copy(update={"average_epochs": 0}))
    assert result.best == max(result.history, key=lambda s: (s.val_acc, -s.val_loss))


class Interrupted(Exception):
    pass


def test_fit_resumes_from_last_checkpoint_with_identical_result(sample, reference, tmp_path):
    def stop_at_two(stats: engine.EpochStats) -> None:
        if stats.epoch == 2:
            raise Interrupted  # before epoch 2's checkpoint is written: like a kill mid-epoch

    with pytest.raises(Interrupted):
        _fit(sample, checkpoint_dir=tmp_path, fingerprint="run", on_epoch=stop_at_two)
    assert [p.name for p in tmp_path.iterdir()] == ["epoch-0001.pt"]

    seen: list[int] = []
    resumed = _fit(
        sample, checkpoint_dir=tmp_path, fingerprint="run", on_epoch=lambda s: seen.append(s.epoch)
    )
    assert seen == [1, 2, 3]  # epoch 1 replayed from the checkpoint, then trained on
    assert resumed.history == reference.history
    assert all(torch.equal(resumed.state_dict[k], v) for k, v in reference.state_dict.items())

    engine.clear_checkpoints(tmp_path)
    assert not tmp_path.exists()


def test_checkpoint_with_other_fingerprint_is_ignored(sample, tmp_path):
    short = TINY.model_copy(update={"epochs": 2, "warmup_epochs": 1})
    _fit(sample, short, checkpoint_dir=tmp_path, fingerprint="other")
    seen: list[int] = []
    _fit(sample, short, checkpoint_dir=tmp_path, fingerprint="mine", on_epoch=lambda s: seen.append(s.epoch))
    assert seen == [1, 2]


def _state(seed: int) -> engine.TrainingState:
    engine.make_deterministic(seed)
    state = engine.build_state(build_model(NET, 10, 28), TINY, steps=3, device=CPU)
    # Stands in for what a later recipe adds (a temperature, an EMA): any object with a state_dict pair.
    state.extras["temperature"] = torch.nn.Linear(1, 1, bias=False)
    return state


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_training_state_round_trips_through_its_one_state_dict(sample):
    trained = _state(7)
    data = engine.prepare_data(*sample, 0.2, 0.3, TINY, CPU, engine.DistInfo())
    loss_fn = torch.nn.CrossEntropyLoss()
    train_loss = engine.train_one_epoch(
        trained, trained.model, data, loss_fn, engine.DistInfo(), tqdm(disable=True)
    )
    trained.keep_best(engine.validate(trained, data, train_loss))
    with torch.no_grad():
        trained.extras["temperature"].weight.fill_(1.5)
    saved = trained.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)  # what a checkpoint holds must load with weights_only
    buffer.seek(0)

    fresh = _state(8)
    assert not _same(fresh.state_dict(), saved)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert _same(fresh.state_dict(), saved)
    assert (fresh.epoch, fresh.best, fresh.history) == (1, trained.best, trained.history)
    assert fresh.extras["temperature"].weight.item() == 1.5
    # Both go on identically: the generators and the schedule came back too.
    again = [
        engine.train_one_epoch(s, s.model, data, loss_fn, engine.DistInfo(), tqdm(disable=True))
        for s in (trained, fresh)
    ]
    assert again[0] == again[1]
    assert _same(fresh.state_dict(), trained.state_dict())


def test_checkpoint_of_the_format_before_training_state_is_ignored(sample, tmp_path, capsys):
    short = TINY.model_copy(update={"epochs": 2, "warmup_epochs": 1})

    def stop_at_two(stats: engine.EpochStats) -> None:
        if stats.epoch == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        _fit(sample, short, checkpoint_dir=tmp_path, fingerprint="run", on_epoch=stop_at_two)
    (path,) = tmp_path.glob("epoch-*.pt")
    saved = torch.load(path, weights_only=True)
    # Format 1 kept the fields flat beside the fingerprint, with no format field.
    torch.save({"fingerprint": "run", **saved["state"]}, path)
    seen: list[int] = []
    _fit(sample, short, checkpoint_dir=tmp_path, fingerprint="run", on_epoch=lambda s: seen.append(s.epoch))
    assert seen == [1, 2]  # trained from the start, not resumed
    assert "written by another version of the training code" in capsys.readouterr().err


def test_fit_rejects_batches_that_do_not_fit(sample):
    with pytest.raises(OracleMnistError, match="larger than the 256 training images"):
        _fit(sample, TINY.model_copy(update={"batch_size": 512}))
    with pytest.raises(OracleMnistError, match="does not split evenly over 3 processes"):
        engine.fit(torch.nn.Linear(1, 1), *sample, 0.2, 0.3, TINY, device=CPU, info=engine.DistInfo(0, 3, 0))


def test_fit_refuses_recipe_settings_left_auto(sample):
    cfg = TINY.model_copy(update={"average_epochs": "auto", "augment": AugmentConfig(cutmix="auto")})
    with pytest.raises(
        OracleMnistError, match=r"^train.augment.cutmix, train.average_epochs: 'auto' must be resolved first"
    ):
        engine.fit(torch.nn.Linear(1, 1), *sample, 0.2, 0.3, cfg, device=CPU)


def test_select_device_auto_and_unavailable_choice():
    if not torch.cuda.is_available():
        with pytest.raises(OracleMnistError, match="'cuda' requested"):
            engine.select_device("cuda")
        assert engine.select_device("auto").type in ("cpu", "mps")
    assert engine.select_device("cpu") == CPU


@pytest.mark.parametrize("native", [True, False])
def test_amp_trains_in_bfloat16_on_cpu_only_where_native_and_faster(native, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    dense, depthwise = build_model("resnet10t", 10, 28), build_model("mobilenetv3_small_100", 10, 32)
    assert engine.amp_dtype(CPU, True, dense) == (torch.bfloat16 if native else None)
    assert engine.amp_dtype(CPU, True, depthwise) is None  # oneDNN's bfloat16 depthwise kernels are slower
    assert engine.amp_dtype(CPU, False, dense) is None
    assert engine.amp_dtype(torch.device("cuda"), True, depthwise) == torch.float16
    assert engine.amp_dtype(torch.device("cuda"), False, depthwise) is None
    assert engine.native_bf16() is native


def test_precision_names_are_the_model_files_values():
    names = [engine.precision_name(d) for d in (None, torch.bfloat16, torch.float16)]
    assert names == ["float32", "bfloat16", "float16"] == list(PRECISIONS)


def test_training_state_holds_the_chosen_precision_and_channels_last_weights(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    state = engine.build_state(build_model("resnet10t", 10, 28), TINY, steps=3, device=CPU)
    assert state.amp == torch.bfloat16 and not state.scaler.is_enabled()
    conv = state.model.conv1[3].weight  # the first has one input channel: both layouts are the same
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    off = engine.build_state(build_model("resnet10t", 10, 28), TINY.model_copy(update={"amp": False}), 3, CPU)
    assert off.amp is None


THREADS_SCRIPT = textwrap.dedent(
    """
    import hashlib, os, sys
    # Before torch loads: OpenMP sizes its default thread pool from the cores this process may use.
    os.sched_setaffinity(0, {int(core) for core in sys.argv[1].split(",")})
    import numpy as np, torch
    from oracle_mnist import engine
    from oracle_mnist.config import AugmentConfig, TrainConfig
    from oracle_mnist.models import build_model

    engine.fix_cpu_threads(2)
    engine.make_deterministic(0)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (128, 28, 28), dtype=np.uint8), rng.integers(0, 10, 128)
    cfg = TrainConfig(
        epochs=2, lr=0.002, warmup_epochs=1, batch_size=32, batches_per_epoch=2, threads=2,
        augment=AugmentConfig(cutmix=0.5), average_epochs=2, label_smoothing=0.1,
    )
    model = build_model("resnet10t", 10, 28)
    result = engine.fit(model, (x, y), (x[:32], y[:32]), 0.3, 0.3, cfg, device=torch.device("cpu"))
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in result.state_dict.values()))
    print(torch.get_num_threads(), digest.hexdigest())
    """
)


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to pin"
)
@pytest.mark.slow
def test_fixed_thread_count_gives_the_same_weights_on_one_core_and_on_two(tmp_path):
    script = tmp_path / "threads_fit.py"
    script.write_text(THREADS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cores = sorted(os.sched_getaffinity(0))[:2]
    # Both at once (the bits cannot depend on timing): half the wall time of one after the other.
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), ",".join(map(str, allowed))],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for allowed in (cores[:1], cores)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out.split())
    assert outputs[0][0] == outputs[1][0] == "2"
    assert outputs[0][1] == outputs[1][1]


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from oracle_mnist import engine
    from oracle_mnist.config import AugmentConfig, TrainConfig

    info = engine.init_distributed("cpu")
    engine.make_deterministic(0)
    # No BatchNorm: with identical global batches the only difference left is float summation order.
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(16, 10),
    )
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (256, 28, 28), dtype=np.uint8), rng.integers(0, 10, 256)
    # CutMix on every image: partners come from the other process's half of the batch too. In float32: the
    # rounding of bfloat16 gradients depends on the batch split, which would leave nothing to compare closely.
    cfg = TrainConfig(
        epochs=2, lr=0.002, warmup_epochs=1, batch_size=32, batches_per_epoch=4, augment=AugmentConfig(cutmix=1.0),
        amp=False, average_epochs=2, label_smoothing=0.1,
    )
    result = engine.fit(model, (x, y), (x[:64], y[:64]), 0.3, 0.3, cfg, device=torch.device("cpu"), info=info)
    if info.is_main:
        torch.save(result.state_dict, sys.argv[1] + ".pt")
        json.dump([s.train_loss for s in result.history], open(sys.argv[1] + ".json", "w"))
    engine.close_distributed(info)
    """
)


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # Both at once (the numbers cannot depend on timing): less wall time than one after the other.
    procs = [
        subprocess.Popen(
            [*cmd, str(tmp_path / out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for cmd, out in [([sys.executable, str(script)], "single"), ([*torchrun, str(script)], "ddp")]
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    single, ddp = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "ddp.pt")
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, rtol=0, atol=1e-4, msg=key)
    np.testing.assert_allclose(
        json.loads((tmp_path / "ddp.json").read_text()),
        json.loads((tmp_path / "single.json").read_text()),
        atol=1e-5,
    )
