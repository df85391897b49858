"""The training loop: deterministic on CPU, resumable from its last finished epoch, DDP-aware under torchrun.

Everything a run carries between epochs is one `TrainingState` with one state_dict()/load_state_dict() pair:
a checkpoint is that state_dict with the run's fingerprint. `fit` drives named steps over it: prepare the data,
build or resume the state, then per epoch train_one_epoch, validate, keep_best and save_checkpoint.

Randomness has three sources, all seeded from `train.seed`: the model's initial weights (the caller seeds torch
before building it), the batch order (one permutation per epoch, seeded by seed and epoch) and the augmentation
(a CPU generator, and one of its own for CutMix, both saved in each checkpoint). The batch order and the
augmentation parameters are drawn for the whole global batch on every process and each process takes its own
rows, so N processes see exactly the batches and augmented images that one process would (CutMix partners
too: every process holds the whole training split); only the split of each batch's BatchNorm statistics
differs (see README).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import update_bn
from tqdm import tqdm

from oracle_mnist.config import AugmentConfig, TrainConfig
from oracle_mnist.errors import OracleMnistError
from oracle_mnist.fsutil import atomic_path
from oracle_mnist.images import to_tensor
from oracle_mnist.models import RECIPE_KEYS, is_depthwise, unwrap

CHECKPOINT_GLOB = "epoch-*.pt"
# Raised whenever the checkpoint layout changes: a checkpoint of another format is ignored, never misread
# (format 1, before TrainingState, had no such field; format 2 had no CutMix generator).
CHECKPOINT_FORMAT = 3
# The elastic warp's control points per image side: a 4 x 4 lattice bends a glyph's strokes as a whole.
ELASTIC_POINTS = 4
# CutMix's generator is seeded with train.seed plus this, so its stream is not the augmentation's own.
MIX_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job; the defaults describe a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_pref: str) -> DistInfo:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1): nccl on CUDA, else gloo."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_pref in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def close_distributed(info: DistInfo) -> None:
    if info.distributed and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def digest_arrays(*arrays: np.ndarray) -> str:
    """sha256 over arrays' dtypes, shapes and contents: identifies data independently of file encoding."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def digest_json(obj: Any) -> str:
    """sha256 of a JSON-able object in canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def select_device(pref: str, info: DistInfo = DistInfo()) -> torch.device:
    """`auto`: CUDA (this process's local GPU), then Apple MPS, then CPU. An unavailable explicit choice fails."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if pref == "cuda" and not cuda:
        raise OracleMnistError("train.device: 'cuda' requested but no CUDA device is available")
    if pref == "mps" and not mps:
        raise OracleMnistError("train.device: 'mps' requested but MPS is not available")
    if pref == "cuda" or (pref == "auto" and cuda):
        return torch.device("cuda", info.local_rank)
    if pref == "mps" or (pref == "auto" and mps):
        return torch.device("mps")
    return torch.device("cpu")


def amp_dtype(device: torch.device, enabled: bool, model: nn.Module) -> torch.dtype | None:
    """The reduced precision train.amp trains `model` in on `device`, or None for float32: wherever it is faster.

    float16 on CUDA (with a loss scaler). bfloat16 on a CPU that computes it natively (AVX512-BF16 or AMX), for a
    network without depthwise convolutions: a training step of resnet10t is 1.6x as fast there (2 threads), but
    one of mobilenetv3_small_100 2.1x as slow (bench/speed.py). float32 elsewhere: emulated bfloat16 is slower.
    """
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and native_bf16() and not any(is_depthwise(m) for m in model.modules()):
        return torch.bfloat16
    return None


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere oneDNN emulates it."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def precision_name(dtype: torch.dtype | None) -> str:
    """The name `amp_dtype`'s choice is recorded under (model file, evaluate.json, logs); None is float32."""
    return str(dtype or torch.float32).removeprefix("torch.")


def make_deterministic(seed: int) -> None:
    """Seed torch and refuse nondeterministic kernels where that is possible.

    On CPU every kernel used here is deterministic, so a run is repeatable bit for bit. CUDA has backward kernels
    without a deterministic version (they use atomics); there we only warn, and repeatability is to within
    floating-point rounding. Must run before CUDA is first used (cuBLAS reads its workspace setting then).
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())


def fix_cpu_threads(threads: int) -> None:
    """Train on CPU with `threads` threads whatever the machine's core count.

    The intra-op thread count decides how convolution and BatchNorm reductions are split, and with it the
    order of their floating-point sums: the same run on 1 and 2 threads ends with different weights. torch's
    default is one thread per core, which would make results depend on the machine.
    """
    torch.set_num_threads(threads)
    # Settable once per process, before any inter-op work, so a second training in one process cannot; inter-op
    # threads only run independent ops side by side and split no sum, so nothing depends on it.
    if torch.get_num_interop_threads() != threads:
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(threads)


@dataclass(frozen=True)
class Draw:
    """One batch's augmentation parameters, a row per image of the global batch."""

    theta: torch.Tensor  # (n, 2, 3) for affine_grid
    erase: torch.Tensor  # (n, 4) box as y0, x0, y1, x1 in [0, 1], zero if not erased
    bend: torch.Tensor  # (n, 2, P, P) elastic control-point moves in affine_grid units
    partner: torch.Tensor  # (n,) the CutMix partner's position in the global batch
    paste: torch.Tensor  # (n, 4) the box the partner is pasted into, zero if none

    def take(self, rows: torch.Tensor | slice) -> Draw:
        return Draw(*(getattr(self, f.name)[rows] for f in fields(self)))


class Augmenter:
    """Random affine (rotate, shear, zoom, shift), elastic bending, erasing and CutMix, applied to a
    normalised batch on its device.

    Parameters are drawn on the CPU from two generators (CutMix's own and one for the rest) in a fixed amount
    per batch, so the result depends on the seed and the batch size only, never on the device or on how many
    processes share the batch.
    """

    def __init__(self, cfg: AugmentConfig, background: float) -> None:
        self.cfg = cfg
        self.background = background

    def draw(self, n: int, gen: torch.Generator, mix_gen: torch.Generator) -> Draw:
        """Parameters for `n` images. CutMix draws from `mix_gen`, the rest from `gen`: each kind is drawn even
        when it is off, so switching one on or off changes no other draw of the run."""
        c = self.cfg
        u = torch.rand(n, 10, generator=gen, dtype=torch.float64)
        bend = (torch.rand(n, 2, ELASTIC_POINTS, ELASTIC_POINTS, generator=gen) * 2 - 1) * c.elastic * 2
        mix = torch.rand(n, 4, generator=mix_gen, dtype=torch.float64)
        partner = torch.randperm(n, generator=mix_gen)
        angle = torch.deg2rad((u[:, 0] * 2 - 1) * c.rotate)
        shear = torch.deg2rad((u[:, 1] * 2 - 1) * c.shear)
        zoom = 1 + (u[:, 2] * 2 - 1) * c.scale
        shift = (u[:, 3:5] * 2 - 1) * c.translate * 2  # affine_grid coordinates span 2 per image side
        cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)
        # Rotation after a horizontal shear, divided by the zoom (theta maps output to input coordinates).
        theta[:, 0, 0], theta[:, 0, 1] = cos / zoom, (cos * tan - sin) / zoom
        theta[:, 1, 0], theta[:, 1, 1] = sin / zoom, (sin * tan + cos) / zoom
        theta[:, :, 2] = shift

        area = 0.02 + u[:, 5] * max(c.erase_max_area - 0.02, 0.0)
        aspect = torch.exp((u[:, 6] * 2 - 1) * math.log(3.0))
        h, w = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)
        y0, x0 = u[:, 7] * (1 - h), u[:, 8] * (1 - w)
        erased = u[:, 9] < c.erase_prob
        erase = torch.stack([y0, x0, y0 + h, x0 + w], dim=1) * erased[:, None]

        # CutMix's box: a square of uniform area (its Beta(1, 1)) around a uniform centre, cut at the edges.
        half = mix[:, 1:2].sqrt() / 2
        centre = mix[:, 2:4]
        paste = torch.cat([(centre - half).clamp(min=0), (centre + half).clamp(max=1)], dim=1)
        paste *= (mix[:, 0] < float(c.cutmix))[:, None]
        return Draw(theta.float(), erase.float(), bend, partner, paste.float())

    def apply(self, x: torch.Tensor, draw: Draw) -> torch.Tensor:
        """The geometric moves and erasing of `draw` (one row per image of `x`)."""
        theta, bend = draw.theta.to(x.device), draw.bend.to(x.device)
        size = x.shape[-1]
        # The control points' moves, interpolated smoothly over the image: strokes bend as a scribe's hand
        # varies, without breaking apart (a per-pixel field would).
        flow = F.interpolate(bend, size=(size, size), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False) + flow
        # Shift so the background is 0: grid_sample's zero padding then fills with background, not grey.
        out = F.grid_sample(x - self.background, grid, mode="bilinear", align_corners=False) + self.background
        return out.masked_fill(_box_mask(draw.erase.to(x.device), size), self.background)

    def mix(self, x: torch.Tensor, mate_x: torch.Tensor, draw: Draw) -> tuple[torch.Tensor, torch.Tensor]:
        """CutMix: each image with its partner's (already augmented) pixels in its paste box, and the share of
        each image still its own, by which the loss weighs its label against the partner's."""
        mask = _box_mask(draw.paste.to(x.device), x.shape[-1])
        return torch.where(mask, mate_x, x), 1 - mask.flatten(1).float().mean(dim=1)


def mixed_target(y: torch.Tensor, mate_y: torch.Tensor, own: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class probabilities (n, num_classes): each image's label and its CutMix partner's, shared by `own`."""
    own = own[:, None]
    return own * F.one_hot(y, num_classes).float() + (1 - own) * F.one_hot(mate_y, num_classes).float()


def _box_mask(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 1, size, size) bool: the pixels whose centres lie in each image's box (y0, x0, y1, x1 in [0, 1])."""
    pos = (torch.arange(size, device=boxes.device, dtype=torch.float32) + 0.5) / size
    inside_y = (pos[None, :] >= boxes[:, 0:1]) & (pos[None, :] < boxes[:, 2:3])
    inside_x = (pos[None, :] >= boxes[:, 1:2]) & (pos[None, :] < boxes[:, 3:4])
    return (inside_y[:, :, None] & inside_x[:, None, :])[:, None]


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_ratio`, as a multiple of the peak learning rate."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    val_acc: float
    lr: float


@dataclass
class FitResult:
    """The kept weights (the late epochs' mean, or the best validation epoch's) with their validation numbers,
    and every epoch's stats.

    Only the main process evaluates, so on the others `best` is None and `state_dict` the last weights.
    """

    state_dict: dict[str, torch.Tensor]
    best: EpochStats | None
    history: list[EpochStats] = field(default_factory=list)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    x: torch.Tensor,
    device: torch.device,
    batch_size: int = 256,
    amp: torch.dtype | None = None,
) -> torch.Tensor:
    """Float32 logits on the CPU for a normalised (N, 1, S, S) tensor, in eval mode; computed in `amp` if given."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out.append(model(x[start : start + batch_size].to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


class Stateful(Protocol):
    """What a later recipe's piece of training state (an EMA of the weights, a temperature) provides."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class WeightAverage:
    """The mean of the model's weights at the end of each of a run's last epochs (stochastic weight averaging,
    Izmailov et al. 2018).

    Why not the best epoch: with 200 validation images that choice rests on a handful of images, and the mean of
    the late epochs scored higher on the test split for every seed tried (docs/results.md). Sums are float64 so
    that the mean of ten nearly equal weights loses nothing to rounding.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, model: nn.Module) -> None:
        for name, value in unwrap(model).state_dict().items():
            if value.is_floating_point():
                value = value.detach().to("cpu", torch.float64)
                self.sums[name] = value + self.sums[name] if name in self.sums else value
        self.count += 1

    def load_mean_into(self, model: nn.Module) -> None:
        """Give `model` the mean weights (integer buffers, BatchNorm's batch counts, keep their values)."""
        own = unwrap(model).state_dict()
        unwrap(model).load_state_dict(
            {
                name: (self.sums[name] / self.count).to(v.dtype) if name in self.sums else v
                for name, v in own.items()
            }
        )

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.count = dict(state["sums"]), state["count"]


@dataclass(eq=False)
class TrainingState:
    """Everything a run carries from one epoch to the next, saved and restored as one object.

    `state_dict()` is the whole checkpoint content and `load_state_dict()` its exact inverse, so a new piece of
    state is added in one place: a field here or, for a recipe's own object, an entry in `extras`.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    aug_gen: torch.Generator
    mix_gen: torch.Generator  # CutMix's own, so runs without it keep the draws of runs before it
    device: torch.device
    amp: torch.dtype | None = None  # train.amp's precision on this device (amp_dtype); None: float32
    epoch: int = 0  # the last finished epoch
    history: list[EpochStats] = field(default_factory=list)
    best: EpochStats | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    extras: dict[str, Stateful] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        cuda = self.device.type == "cuda"
        return {
            "epoch": self.epoch,
            "model": _cpu_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "aug_rng": self.aug_gen.get_state(),
            "mix_rng": self.mix_gen.get_state(),
            # The global generators too: a model with dropout or stochastic depth draws from them.
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else None,
            "history": [asdict(h) for h in self.history],
            "best": asdict(self.best) if self.best is not None else None,
            "best_weights": self.best_weights,
            "extras": {name: part.state_dict() for name, part in self.extras.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.aug_gen.set_state(state["aug_rng"])
        self.mix_gen.set_state(state["mix_rng"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.epoch = state["epoch"]
        self.history = [EpochStats(**h) for h in state["history"]]
        self.best = EpochStats(**state["best"]) if state["best"] is not None else None
        self.best_weights = state["best_weights"]
        for name, part in self.extras.items():
            part.load_state_dict(state["extras"][name])

    def keep_best(self, stats: EpochStats) -> None:
        """Record a validated epoch; its weights are kept when it is the best so far."""
        self.history.append(stats)
        # Ties on accuracy (frequent on a small validation split) go to the lower validation loss.
        if self.best is None or (stats.val_acc, -stats.val_loss) > (self.best.val_acc, -self.best.val_loss):
            self.best, self.best_weights = stats, _cpu_state(self.model)

    def result(self) -> FitResult:
        if self.best is None or self.best_weights is None:
            return FitResult(state_dict=_cpu_state(self.model), best=None)
        return FitResult(state_dict=self.best_weights, best=self.best, history=list(self.history))


@dataclass(frozen=True, eq=False)
class TrainData:
    """A run's tensors, batch plan and augmentation: not saved, rebuilt identically on every (re)start."""

    train_x: torch.Tensor  # normalised, on the training device
    train_y: torch.Tensor
    val_x: torch.Tensor  # normalised, on the CPU: predict_logits moves it batch by batch
    val_y: torch.Tensor
    seed: int  # the batch order's: epoch e shuffles with seed + e
    augment: Augmenter
    global_batch: int
    steps: int  # batches per epoch
    # Images of the averaged weights' BatchNorm pass: all, or as many as an epoch capped by
    # train.batches_per_epoch trains on (a shrunken test run need not pay for a whole pass).
    bn_images: int


def prepare_data(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    mean: float,
    std: float,
    cfg: TrainConfig,
    device: torch.device,
    info: DistInfo,
) -> TrainData:
    if cfg.batch_size % info.world_size:
        raise OracleMnistError(
            f"train.batch_size: {cfg.batch_size} does not split evenly over {info.world_size} processes"
        )
    train_x, train_y = to_tensor(train[0], mean, std).to(device), torch.as_tensor(train[1]).long().to(device)
    background = float(to_tensor(np.zeros((1, 1), np.uint8), mean, std).item())
    steps = len(train_x) // cfg.batch_size
    if cfg.batches_per_epoch is not None:
        steps = min(steps, cfg.batches_per_epoch)
    if steps < 1:
        raise OracleMnistError(
            f"train.batch_size: {cfg.batch_size} is larger than the {len(train_x)} training images"
        )
    return TrainData(
        train_x=train_x,
        train_y=train_y,
        val_x=to_tensor(val[0], mean, std),
        val_y=torch.as_tensor(val[1]).long(),
        seed=cfg.seed,
        augment=Augmenter(cfg.augment, background),
        global_batch=cfg.batch_size,
        steps=steps,
        bn_images=len(train_x) if cfg.batches_per_epoch is None else steps * cfg.batch_size,
    )


def build_state(model: nn.Module, cfg: TrainConfig, steps: int, device: torch.device) -> TrainingState:
    """A fresh training state for `model` (already seeded and built), `steps` batches per epoch."""
    # Channels-last convolutions: a step 1.15x (resnet10t) to 1.6x (mobilenetv3_small_100) as fast on CPU
    # (oneDNN, bench/speed.py), and the layout CUDA's tensor cores want.
    model = model.to(device, memory_format=torch.channels_last)
    amp = amp_dtype(device, cfg.amp, model)
    # The fused kernel is several times faster than the default loop on CPU, and equally deterministic.
    optimizer = torch.optim.AdamW(
        param_groups_weight_decay(model, cfg.weight_decay), lr=cfg.lr, fused=device.type in ("cpu", "cuda")
    )
    warmup, total = cfg.warmup_epochs * steps, cfg.epochs * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total, cfg.min_lr / cfg.lr)
    )
    return TrainingState(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda", enabled=amp == torch.float16),
        aug_gen=torch.Generator().manual_seed(cfg.seed),
        mix_gen=torch.Generator().manual_seed(cfg.seed + MIX_SEED_OFFSET),
        device=device,
        amp=amp,
        extras={"average": WeightAverage()} if cfg.average_epochs else {},
    )


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(directory.glob(CHECKPOINT_GLOB)) if directory.is_dir() else []
    return found[-1] if found else None


def clear_checkpoints(directory: Path) -> None:
    """Remove a finished run's checkpoint folder (the final outputs hold everything worth keeping), with any
    temporary file a killed earlier attempt left in it."""
    shutil.rmtree(directory, ignore_errors=True)


def save_checkpoint(state: TrainingState, directory: Path, fingerprint: str) -> Path:
    path = directory / f"epoch-{state.epoch:04d}.pt"
    with atomic_path(path) as tmp:
        torch.save(
            {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "state": state.state_dict()}, tmp
        )
    # Only the newest checkpoint is needed to resume; older ones would only fill the disk.
    for old in directory.glob(CHECKPOINT_GLOB):
        if old != path:
            old.unlink(missing_ok=True)
    return path


def resume(state: TrainingState, directory: Path, fingerprint: str, info: DistInfo, epochs: int) -> None:
    """Load the newest checkpoint in `directory` into `state` if it is of this format and this run."""
    last = latest_checkpoint(directory)
    if last is None:
        return
    saved = torch.load(last, map_location="cpu", weights_only=True)
    if saved.get("format") != CHECKPOINT_FORMAT:
        if info.is_main:
            print(f"ignoring {last}: written by another version of the training code", file=sys.stderr)
    elif saved.get("fingerprint") != fingerprint:
        if info.is_main:
            print(f"ignoring {last}: it belongs to other params or data", file=sys.stderr)
    else:
        state.load_state_dict(saved["state"])
        if info.is_main:
            print(f"resuming from {last} (epoch {state.epoch} of {epochs})", file=sys.stderr)


def wrap_distributed(state: TrainingState, info: DistInfo) -> nn.Module:
    """The module to train: `state.model` itself, or under torchrun its DDP wrapper (sharing its weights)."""
    if not info.distributed:
        return state.model
    if state.device.type == "cuda":
        # One BatchNorm over the global batch, as a single process would compute it (gloo has no SyncBN).
        state.model = nn.SyncBatchNorm.convert_sync_batchnorm(state.model)
    device_ids = [state.device.index] if state.device.type == "cuda" else None
    return DistributedDataParallel(state.model, device_ids=device_ids)


def optimizer_step(
    state: TrainingState,
    net: nn.Module,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mate: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """One update on one batch (in train.amp's precision, see amp_dtype); returns the batch's loss.

    `mate`: the CutMix partners' labels and each image's own share, for a loss on the mixed labels; without it
    the loss takes the labels as they are (bit for bit the loss of runs before CutMix)."""
    with torch.autocast(state.device.type, dtype=state.amp, enabled=state.amp is not None):
        logits = net(x)
        loss = loss_fn(logits, y if mate is None else mixed_target(y, *mate, logits.shape[1]))
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    return loss.item()


def train_one_epoch(
    state: TrainingState, net: nn.Module, data: TrainData, loss_fn: nn.Module, info: DistInfo, bar: tqdm
) -> float:
    """Epoch `state.epoch + 1` over this process's share of the batches; the mean loss over all processes."""
    # The permutation DistributedSampler would draw, taken whole: every process knows the global batch, so a
    # CutMix partner may be any image of it, whichever process trains on it.
    order = torch.randperm(
        len(data.train_x), generator=torch.Generator().manual_seed(data.seed + state.epoch + 1)
    )
    mine = slice(info.rank, None, info.world_size)
    net.train()
    loss_sum = torch.zeros(2, dtype=torch.float64)
    for step in range(data.steps):
        batch = order[step * data.global_batch : (step + 1) * data.global_batch].to(state.device)
        drawn = data.augment.draw(data.global_batch, state.aug_gen, state.mix_gen)
        own, idx = drawn.take(mine), batch[mine]
        x, mate = data.augment.apply(data.train_x[idx], own), None
        if data.augment.cfg.cutmix:
            mate_idx = batch[own.partner.to(batch.device)]
            # One process already holds the whole batch augmented (the same pixels a second pass would give:
            # each image's moves are its own); under DDP a partner may be another process's, so it is redone.
            if info.distributed:
                mate_x = data.augment.apply(data.train_x[mate_idx], drawn.take(own.partner))
            else:
                mate_x = x[own.partner.to(x.device)]
            x, own_share = data.augment.mix(x, mate_x, own)
            mate = (data.train_y[mate_idx], own_share)
        loss = optimizer_step(state, net, loss_fn, x, data.train_y[idx], mate)
        loss_sum += torch.tensor([loss * len(idx), len(idx)], dtype=torch.float64)
        bar.update()
        bar.set_postfix(loss=f"{loss_sum[0].item() / loss_sum[1].item():.4f}")
    if info.distributed:
        torch_dist.all_reduce(loss_sum)
    state.epoch += 1
    return loss_sum[0].item() / loss_sum[1].item()


def validate(state: TrainingState, data: TrainData, train_loss: float) -> EpochStats:
    """The finished epoch's numbers on the validation split (main process only)."""
    logits = predict_logits(state.model, data.val_x, state.device, amp=state.amp)
    return EpochStats(
        epoch=state.epoch,
        train_loss=train_loss,
        val_loss=F.cross_entropy(logits, data.val_y).item(),
        val_acc=(logits.argmax(1) == data.val_y).double().mean().item(),
        lr=state.optimizer.param_groups[0]["lr"],
    )


def fit(
    model: nn.Module,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    mean: float,
    std: float,
    cfg: TrainConfig,
    *,
    device: torch.device,
    info: DistInfo = DistInfo(),
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> FitResult:
    """Train `model` (already seeded and built) on uint8 feature arrays; keep the mean of the last
    `cfg.average_epochs` epochs' weights, or with 0 the best epoch by validation accuracy.

    With `checkpoint_dir`, the main process saves everything needed to continue after each epoch and a new
    call with the same `fingerprint` resumes from the last one. `on_epoch` sees every epoch's stats in order
    (replayed ones first after a resume) on the main process.
    """
    unresolved = [
        ".".join(path)
        for path in RECIPE_KEYS
        if path[0] == "train" and functools.reduce(getattr, path[1:], cfg) == "auto"
    ]
    if unresolved:
        raise OracleMnistError(
            f"{', '.join(unresolved)}: 'auto' must be resolved first (models.resolve_recipe)"
        )
    data = prepare_data(train, val, mean, std, cfg, device, info)
    state = build_state(model, cfg, data.steps, device)
    if checkpoint_dir is not None:
        resume(state, checkpoint_dir, fingerprint, info, cfg.epochs)
    if info.is_main and on_epoch is not None:
        for stats in state.history:
            on_epoch(stats)
    net = wrap_distributed(state, info)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    while state.epoch < cfg.epochs:
        desc = f"epoch {state.epoch + 1}/{cfg.epochs}"
        with tqdm(total=data.steps, desc=desc, file=sys.stderr, disable=not info.is_main, leave=True) as bar:
            train_loss = train_one_epoch(state, net, data, loss_fn, info, bar)
            if "average" in state.extras and state.epoch > cfg.epochs - cfg.average_epochs:
                state.extras["average"].add(state.model)
            if not info.is_main:
                continue
            stats = validate(state, data, train_loss)
            bar.set_postfix(
                loss=f"{train_loss:.4f}", val_loss=f"{stats.val_loss:.4f}", val_acc=f"{stats.val_acc:.4f}"
            )
            state.keep_best(stats)
            if on_epoch is not None:
                on_epoch(stats)
            if checkpoint_dir is not None:
                save_checkpoint(state, checkpoint_dir, fingerprint)
    if "average" in state.extras:
        keep_average(state, data, info)
    return state.result()


def keep_average(state: TrainingState, data: TrainData, info: DistInfo) -> None:
    """Make the averaged weights the kept ones, with BatchNorm statistics of their own.

    Every process takes part: under DDP on CUDA the statistics come from SyncBatchNorm, which needs them all.
    The running statistics of the averaged epochs belong to none of the averaged weights, so they are measured
    afresh on the training images, without augmentation, as the model will see images when it serves.
    """
    state.extras["average"].load_mean_into(state.model)
    update_bn(data.train_x[: data.bn_images].split(data.global_batch), state.model)
    if info.is_main:
        stats = validate(state, data, state.history[-1].train_loss)
        state.best, state.best_weights = stats, _cpu_state(state.model)
