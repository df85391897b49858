"""Training-step time per memory layout and precision, for the models the recipes are measured on.

    python bench/speed.py [--models resnet10t mobilenetv3_small_100] [--steps 8] [--threads 2]

One AdamW step (forward, CutMix-free loss, backward, update) on a batch of train.batch_size random images at
each model's recipe size, on the CPU with train.threads threads: float32 in the default (contiguous) layout,
float32 channels-last, and bfloat16 autocast channels-last (where the CPU computes bfloat16 natively). The
engine trains channels-last and in what `engine.amp_dtype` picks; the last column says which that is.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from oracle_mnist import engine
from oracle_mnist.config import load_params
from oracle_mnist.models import Recipe, build_model, recipe_for

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
MODELS = ("resnet10t", "resnet18", "mobilenetv3_small_100", "efficientnet_b0", "convnext_atto")


def step_time(name: str, recipe: Recipe, batch: int, steps: int, channels_last: bool, bf16: bool) -> float:
    """Median seconds per training step at the recipe's image size and network, after two warm-up steps."""
    engine.make_deterministic(0)
    size = recipe.image_size
    model = build_model(name, 10, size, network=recipe.network)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.002, fused=True)
    x, y = torch.randn(batch, 1, size, size), torch.randint(0, 10, (batch,))
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, help="default: train.threads in params.yaml")
    args = parser.parse_args()
    train = load_params(REPO / "params.yaml").train
    engine.fix_cpu_threads(args.threads or train.threads)
    native = engine.native_bf16()
    print(f"{torch.get_num_threads()} threads, batch {train.batch_size}, native bfloat16: {native}")
    print(
        f"{'model':<24}{'px':>4}{'float32':>10}{'channels-last':>15}{'+ bfloat16':>12}  the engine's choice"
    )
    for name in args.models:
        recipe = recipe_for(name)
        size = recipe.image_size
        plain, last = (
            step_time(name, recipe, train.batch_size, args.steps, cl, False) for cl in (False, True)
        )
        bf16 = step_time(name, recipe, train.batch_size, args.steps, True, True) if native else float("nan")
        chosen = engine.amp_dtype(CPU, train.amp, build_model(name, 10, size, network=recipe.network))
        used = bf16 if chosen == torch.bfloat16 else last
        print(
            f"{name:<24}{size:>4}{plain:>9.3f}s{last:>14.3f}s{bf16:>11.3f}s  "
            f"{engine.precision_name(chosen)} channels-last, {plain / used:.2f}x as fast"
        )


if __name__ == "__main__":
    main()
