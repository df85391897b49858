"""Each stage's time in a user's two main runs: `dvc repro` of a fresh copy, then `dvc exp run -S model=NAME`.

    python bench/pipeline.py                                  # then -S model=efficientnet_b0
    python bench/pipeline.py --model resnet18
    python bench/pipeline.py --set train.epochs=2             # any param changed in both runs (a quick try)

On a GPU machine this is the whole GPU check: `pip install -r requirements.txt && pip install --no-deps -e .`,
then this script. The copy holds the repository's committed-or-new files (no outputs, no caches), as a fresh
clone does. A stage's time runs from DVC's "Running stage" line to the next stage's (or the run's end), so it
includes hashing and caching its outputs. The second run shows which stages a new model reruns: prepare never
does; featurize does when the model's recipe wants another image size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from oracle_mnist import engine
from oracle_mnist.config import load_params

# The repository copy is the tests' own (tests/helpers.py), the --set parser bench/models.py's.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import git, make_repo_copy
from models import STAGES, parse_set

STAGE_LINE = re.compile(r"^(Running stage|Stage) '([\w-]+)'(.*)")


def device_name(setting: str) -> str:
    """The device the train stage picks for `train.device` = `setting` (its own picker), in words."""
    device = engine.select_device(setting)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    if device.type != "cpu":
        return device.type
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0] if names else platform.processor() or 'a CPU'}, {os.cpu_count()} cores"


def timed_dvc(repo: Path, *args: str) -> dict[str, float | str]:
    """Runs `dvc ARGS` in `repo`, echoing its output, and returns each stage's seconds, or what DVC did
    instead of running it ("skipped": unchanged, "restored": from the run-cache)."""
    env = os.environ | {"PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1"}
    cmd = [sys.executable, "-m", "dvc", *args]
    print(f"\n$ {' '.join(['dvc', *args])}", flush=True)
    result: dict[str, float | str] = {}
    current, started = None, 0.0
    # Relayed as it comes, progress bars' carriage returns too; parsed a line at a time.
    with subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        pending = b""
        while chunk := os.read(proc.stdout.fileno(), 65536):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                match = STAGE_LINE.match(line.decode(errors="replace").strip())
                if not match:
                    continue
                now = time.perf_counter()
                if current is not None:
                    result[current] = round(now - started, 1)
                    current = None
                kind, stage, rest = match.groups()
                if kind == "Running stage":
                    current, started = stage, now
                elif "didn't change" in rest:
                    result[stage] = "skipped"
                elif "cached" in rest:
                    result[stage] = "restored"
    if current is not None:
        result[current] = round(time.perf_counter() - started, 1)
    if proc.returncode != 0:
        raise SystemExit(
            f"error: dvc {' '.join(args)} exited {proc.returncode} in {repo} (its output is above)"
        )
    return result


def cell(value: float | str | None) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="efficientnet_b0", help="the second run's -S model=NAME")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="params changed in both runs"
    )
    parser.add_argument("--keep", type=Path, help="make the copy here and keep it (default: a temporary one)")
    args = parser.parse_args()
    changes = parse_set(args.set)
    with tempfile.TemporaryDirectory(prefix="oracle-mnist-pipeline-") as tmp:
        repo = args.keep or Path(tmp) / "repo"
        if repo.exists():
            raise SystemExit(f"error: --keep {repo}: already exists; name a new folder")
        make_repo_copy(repo, repo / "data/sources/oracle-mnist-sample", changes)
        # Read before `dvc exp run` rewrites them: the first run's params, --set included.
        params = load_params(repo / "params.yaml")
        device = device_name(params.train.device)
        print(f"device: {device}\ncopy: {repo}", flush=True)
        start = time.perf_counter()
        first = timed_dvc(repo, "repro")
        first_total = time.perf_counter() - start
        first_metrics = json.loads((repo / "metrics/evaluate.json").read_text(encoding="utf-8"))
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", "dvc repro")
        start = time.perf_counter()
        second = timed_dvc(repo, "exp", "run", "-S", f"model={args.model}")
        second_total = time.perf_counter() - start
        second_metrics = json.loads((repo / "metrics/evaluate.json").read_text(encoding="utf-8"))

    changed = "".join(f", {item}" for item in args.set)
    print(f"\ndevice: {device}")
    print(f"| stage | `dvc repro` ({params.model}{changed}) | `dvc exp run -S model={args.model}` |")
    print("| --- | --- | --- |")
    for stage in STAGES:
        print(f"| {stage} | {cell(first.get(stage))} | {cell(second.get(stage))} |")
    print(f"| whole run | {first_total:.1f} s | {second_total:.1f} s |")
    for name, report in (("dvc repro", first_metrics), (f"-S model={args.model}", second_metrics)):
        print(
            f"{name}: test accuracy {100 * report['accuracy']:.2f}%, ECE {report['ece']:.3f}, "
            f"{report['precision']}; {report['recipe']}"
        )


if __name__ == "__main__":
    main()
