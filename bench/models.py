"""Test accuracy, calibration and time of the whole pipeline per model and seed, each run as a user runs it.

    python bench/models.py                                     # the default model, train.seed 0 1 2
    python bench/models.py --models efficientnet_b0 mobilenetv3_small_100 resnet18 convnext_atto --seeds 0
    python bench/models.py --jobs 2                            # two runs at a time
    python bench/models.py --set train.label_smoothing=0.2     # any param changed too, as `-S key=value`

Each run happens in its own copy of the repository's committed-or-new files (no outputs, no caches), with only
`model`, `train.seed` and the `--set` params changed -- what `dvc exp run -S model=NAME` changes -- and `dvc repro` stage by stage,
each stage timed. Prints one row per run, then the mean and spread per model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import reduce
from pathlib import Path
from typing import Any

import yaml

# The repository copy and the dvc runner are the tests' own (tests/helpers.py); tests/ is not a package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import REPO, deep_merge, dvc, make_repo_copy

STAGES = ("prepare", "featurize", "train", "evaluate", "export")


def run_one(model: str, seed: int, workdir: Path, changes: dict[str, Any]) -> dict[str, object]:
    repo = workdir / f"{model}-{seed}"
    overrides = deep_merge(changes, {"model": model, "train": {"seed": seed}})
    make_repo_copy(repo, repo / "data/sources/oracle-mnist-sample", overrides)
    times = {}
    for stage in STAGES:
        start = time.perf_counter()
        dvc(repo, "repro", "--single-item", stage, timeout=7200)
        times[stage] = round(time.perf_counter() - start, 1)
    report = json.loads((repo / "metrics/evaluate.json").read_text(encoding="utf-8"))
    return {
        "model": model,
        "seed": seed,
        **report,
        "seconds": times,
        "total_s": round(sum(times.values()), 1),
    }


def parse_set(items: list[str]) -> dict[str, Any]:
    """`key.path=value` pairs (values read as YAML, as `dvc exp run -S` does) as one nested mapping."""
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set {item!r}: expected KEY=VALUE, e.g. train.label_smoothing=0.2")
        *parents, leaf = key.split(".")
        changes = deep_merge(
            changes,
            reduce(lambda inner, name: {name: inner}, reversed(parents), {leaf: yaml.safe_load(value)}),
        )
    return changes


def main() -> None:
    default = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["model"]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=[default])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other params to change")
    args = parser.parse_args()
    changes = parse_set(args.set)
    with tempfile.TemporaryDirectory(prefix="oracle-mnist-models-") as tmp:
        runs = [(m, s) for m in args.models for s in args.seeds]
        rows = []
        with ThreadPoolExecutor(args.jobs) as pool:
            for row in pool.map(lambda ms: run_one(*ms, Path(tmp), changes), runs):
                print(json.dumps(row), flush=True)  # a run can take many minutes: each row as it ends
                rows.append(row)
    print("\n| model | recipe | seeds | test accuracy, mean (min-max) | ECE, mean | dvc repro, mean s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model in args.models:
        mine = [r for r in rows if r["model"] == model]
        acc = [float(r["accuracy"]) for r in mine]
        print(
            f"| {model} | {mine[0]['recipe']} | {len(mine)} | {100 * statistics.mean(acc):.2f}% ({100 * min(acc):.2f}-{100 * max(acc):.2f}) "
            f"| {statistics.mean(float(r['ece']) for r in mine):.3f} "
            f"| {statistics.mean(float(r['total_s']) for r in mine):.0f} |"
        )


if __name__ == "__main__":
    main()
