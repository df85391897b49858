"""The training loop: deterministic on CPU, resumable from its last finished epoch, DDP-aware under torchrun.

Randomness has three sources, all seeded from `train.seed` and saved in each checkpoint: the model's initial
weights (the caller seeds torch before building it), the batch order (DistributedSampler, seeded per epoch)
and the augmentation (one CPU generator). Augmentation parameters are drawn for the whole global batch on every
process and each process takes its own rows, so N processes see exactly the batches and augmented images that
one process would; only the split of each batch's BatchNorm statistics differs (see README).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from oracle_mnist.config import AugmentConfig, TrainConfig
from oracle_mnist.errors import OracleMnistError
from oracle_mnist.fsutil import atomic_path
from oracle_mnist.images import to_tensor
from oracle_mnist.models import unwrap

CHECKPOINT_GLOB = "epoch-*.pt"


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


class Augmenter:
    """Random affine (rotate, shear, zoom, shift) and erasing, applied to a normalised batch on its device.

    Parameters are drawn on the CPU from one generator in a fixed amount per image, so the result depends on
    the seed and the batch size only, never on the device or on how many processes share the batch.
    """

    def __init__(self, cfg: AugmentConfig, background: float) -> None:
        self.cfg = cfg
        self.background = background

    def draw(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(theta (n, 2, 3) for affine_grid, erase boxes (n, 4) as y0, x0, y1, x1 in [0, 1]; empty if not erased)."""
        c = self.cfg
        u = torch.rand(n, 10, generator=gen, dtype=torch.float64)
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
        boxes = torch.stack([y0, x0, y0 + h, x0 + w], dim=1) * erased[:, None]
        return theta.float(), boxes.float()

    def apply(self, x: torch.Tensor, theta: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        theta, boxes = theta.to(x.device), boxes.to(x.device)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # Shift so the background is 0: grid_sample's zero padding then fills with background, not grey.
        out = F.grid_sample(x - self.background, grid, mode="bilinear", align_corners=False) + self.background
        size = x.shape[-1]
        pos = (torch.arange(size, device=x.device, dtype=torch.float32) + 0.5) / size
        inside_y = (pos[None, :] >= boxes[:, 0:1]) & (pos[None, :] < boxes[:, 2:3])
        inside_x = (pos[None, :] >= boxes[:, 1:2]) & (pos[None, :] < boxes[:, 3:4])
        mask = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]
        return out.masked_fill(mask, self.background)


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
    """The kept (best validation accuracy) epoch's weights and numbers, and every epoch's stats.

    Only the main process evaluates, so on the others `best` is None and `state_dict` the last weights.
    """

    state_dict: dict[str, torch.Tensor]
    best: EpochStats | None
    history: list[EpochStats] = field(default_factory=list)


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 256, amp: bool = False
) -> torch.Tensor:
    """Float32 logits on the CPU for a normalised (N, 1, S, S) tensor, in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp and device.type == "cuda"):
            out.append(model(x[start : start + batch_size].to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(directory.glob(CHECKPOINT_GLOB)) if directory.is_dir() else []
    return found[-1] if found else None


def clear_checkpoints(directory: Path) -> None:
    """Remove a finished run's checkpoint folder (the final outputs hold everything worth keeping), with any
    temporary file a killed earlier attempt left in it."""
    shutil.rmtree(directory, ignore_errors=True)


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
    """Train `model` (already seeded and built) on uint8 feature arrays; keep the best epoch by val accuracy.

    With `checkpoint_dir`, the main process saves everything needed to continue after each epoch and a new
    call with the same `fingerprint` resumes from the last one. `on_epoch` sees every epoch's stats in order
    (replayed ones first after a resume) on the main process.
    """
    if cfg.batch_size % info.world_size:
        raise OracleMnistError(
            f"train.batch_size: {cfg.batch_size} does not split evenly over {info.world_size} processes"
        )
    local_batch = cfg.batch_size // info.world_size
    train_x, train_y = to_tensor(train[0], mean, std).to(device), torch.as_tensor(train[1]).long().to(device)
    val_x, val_y = to_tensor(val[0], mean, std), torch.as_tensor(val[1]).long()
    background = float(to_tensor(np.zeros((1, 1), np.uint8), mean, std).item())
    augment = Augmenter(cfg.augment, background)
    sampler = DistributedSampler(
        range(len(train_x)), num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed
    )
    steps = len(sampler) // local_batch
    if cfg.batches_per_epoch is not None:
        steps = min(steps, cfg.batches_per_epoch)
    if steps < 1:
        raise OracleMnistError(
            f"train.batch_size: {cfg.batch_size} is larger than the {len(train_x)} training images"
        )

    model = model.to(device)
    # The fused kernel is several times faster than the default loop on CPU, and equally deterministic.
    optimizer = torch.optim.AdamW(
        param_groups_weight_decay(model, cfg.weight_decay), lr=cfg.lr, fused=device.type in ("cpu", "cuda")
    )
    warmup, total = cfg.warmup_epochs * steps, cfg.epochs * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total, cfg.min_lr / cfg.lr)
    )
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    aug_gen = torch.Generator().manual_seed(cfg.seed)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    history: list[EpochStats] = []
    best: tuple[EpochStats, dict[str, torch.Tensor]] | None = None
    start_epoch = 1
    last = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if last is not None:
        state = torch.load(last, map_location="cpu", weights_only=True)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            aug_gen.set_state(state["aug_rng"])
            torch.set_rng_state(state["torch_rng"])
            if device.type == "cuda" and state["cuda_rng"] is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], device)
            history = [EpochStats(**h) for h in state["history"]]
            best = (EpochStats(**state["best_stats"]), state["best_state"])
            start_epoch = state["epoch"] + 1
            if info.is_main:
                print(f"resuming from {last} (epoch {state['epoch']} of {cfg.epochs})", file=sys.stderr)
        elif info.is_main:
            print(f"ignoring {last}: it belongs to other params or data", file=sys.stderr)
    if on_epoch is not None and info.is_main:
        for stats in history:
            on_epoch(stats)

    if info.distributed:
        if device.type == "cuda":
            # One BatchNorm over the global batch, as a single process would compute it (gloo has no SyncBN).
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    for epoch in range(start_epoch, cfg.epochs + 1):
        sampler.set_epoch(epoch)
        order = torch.as_tensor(list(sampler))
        model.train()
        loss_sum = torch.zeros(2, dtype=torch.float64)
        bar = tqdm(
            total=steps,
            desc=f"epoch {epoch}/{cfg.epochs}",
            file=sys.stderr,
            disable=not info.is_main,
            leave=True,
        )
        for step in range(steps):
            idx = order[step * local_batch : (step + 1) * local_batch].to(device)
            theta, boxes = augment.draw(cfg.batch_size, aug_gen)
            mine = slice(info.rank, None, info.world_size)
            x = augment.apply(train_x[idx], theta[mine], boxes[mine])
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                loss = criterion(model(x), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += torch.tensor([loss.item() * len(idx), len(idx)], dtype=torch.float64)
            bar.update()
            bar.set_postfix(loss=f"{loss_sum[0].item() / loss_sum[1].item():.4f}")
        if info.distributed:
            torch_dist.all_reduce(loss_sum)
        train_loss = loss_sum[0].item() / loss_sum[1].item()

        if info.is_main:
            logits = predict_logits(unwrap(model), val_x, device, amp=use_amp)
            stats = EpochStats(
                epoch=epoch,
                train_loss=train_loss,
                val_loss=F.cross_entropy(logits, val_y).item(),
                val_acc=(logits.argmax(1) == val_y).double().mean().item(),
                lr=optimizer.param_groups[0]["lr"],
            )
            bar.set_postfix(
                loss=f"{train_loss:.4f}", val_loss=f"{stats.val_loss:.4f}", val_acc=f"{stats.val_acc:.4f}"
            )
            history.append(stats)
            # Ties on accuracy (frequent on a small validation split) go to the lower validation loss.
            if best is None or (stats.val_acc, -stats.val_loss) > (best[0].val_acc, -best[0].val_loss):
                best = (stats, _cpu_state(model))
            if on_epoch is not None:
                on_epoch(stats)
            if checkpoint_dir is not None:
                _save_checkpoint(
                    checkpoint_dir,
                    epoch,
                    fingerprint,
                    model,
                    optimizer,
                    scheduler,
                    scaler,
                    aug_gen,
                    history,
                    best,
                )
        bar.close()

    if best is None:
        return FitResult(state_dict=_cpu_state(model), best=None)
    return FitResult(state_dict=best[1], best=best[0], history=history)


def _save_checkpoint(
    directory: Path,
    epoch: int,
    fingerprint: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    aug_gen: torch.Generator,
    history: list[EpochStats],
    best: tuple[EpochStats, dict[str, torch.Tensor]],
) -> None:
    state = {
        "fingerprint": fingerprint,
        "epoch": epoch,
        "model": _cpu_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "aug_rng": aug_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "history": [asdict(h) for h in history],
        "best_stats": asdict(best[0]),
        "best_state": best[1],
    }
    path = directory / f"epoch-{epoch:04d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    # Only the newest checkpoint is needed to resume; older ones would only fill the disk.
    for old in directory.glob(CHECKPOINT_GLOB):
        if old != path:
            old.unlink(missing_ok=True)
