"""Install size of the lock in a fresh venv: the whole lock and the CPU path of the README's "Quick start".

    python bench/install.py [--variants full cpu] [--keep DIR]

Each variant is installed the way the README says (the lock with its hashes, then the project with --no-deps)
into a new venv in a temporary folder, checked by running the model, engine, export and inference tests inside
it (slow ones included), measured (bytes of regular files, by what they belong to) and deleted. The install reads
the lock's wheels from pip's configured sources; it takes minutes and about 6.5 GB of disk per variant.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECK_TESTS = [
    "tests/test_models.py",
    "tests/test_engine.py",
    "tests/test_export.py",
    "tests/test_inference.py",
]
# Site-packages entries reported apart: the GPU stack, and torch itself.
GROUPS = {"nvidia": "NVIDIA libraries", "triton": "Triton", "cuda": "cuda-python", "torch": "torch"}


def run(args: list[str], **kwargs) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise SystemExit(
            f"error: {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )


def requirements(variant: str, folder: Path) -> Path:
    if variant == "full":
        return REPO / "requirements.txt"
    out = folder / "requirements-cpu.txt"
    with out.open("w", encoding="utf-8") as f:
        subprocess.run(
            [
                sys.executable,
                str(REPO / "dockerfiles/lock_subset.py"),
                "--cpu",
                str(REPO / "requirements.txt"),
            ],
            stdout=f,
            check=True,
        )
    return out


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under path, links not followed (what `du --apparent-size` counts)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            path_ = os.path.join(root, name)
            if not os.path.islink(path_):
                total += os.lstat(path_).st_size
    return total


def sizes(venv: Path) -> dict[str, int]:
    site = next(venv.glob("lib/python3*/site-packages"))
    groups = dict.fromkeys([*GROUPS.values(), "everything else"], 0)
    for entry in site.iterdir():
        top = entry.name.split("-")[0].split("_")[0].split(".")[0].lower()
        size = tree_bytes(entry) if entry.is_dir() and not entry.is_symlink() else entry.lstat().st_size
        groups[GROUPS.get(top, "everything else")] += size
    groups["everything else"] += tree_bytes(venv) - sum(groups.values())
    return groups


def measure(variant: str, folder: Path) -> dict[str, int]:
    venv = folder / f"venv-{variant}"
    run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin/python"), "-m", "pip", "--disable-pip-version-check"]
    lock = requirements(variant, folder)
    count = lock.read_text(encoding="utf-8").count("==")
    print(f"{variant}: installing {count} locked packages into {venv} ...", flush=True)
    start = time.perf_counter()
    # The README's commands: the whole lock resolves as is; the CPU subset needs --no-deps (torch's metadata
    # still names what the subset leaves out).
    extra = [] if variant == "full" else ["--no-deps", "--require-hashes"]
    run([*pip, "install", "--no-cache-dir", *extra, "-r", str(lock)])
    run([*pip, "install", "--no-cache-dir", "--no-deps", "-e", str(REPO)])
    print(f"{variant}: installed in {time.perf_counter() - start:.0f} s; running the tests ...", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    run(
        [str(venv / "bin/python"), "-m", "pytest", "-q", "-n0", "-p", "no:cacheprovider", *CHECK_TESTS],
        cwd=REPO,
        env=env,
    )
    print(f"{variant}: {', '.join(CHECK_TESTS)} passed", flush=True)
    return sizes(venv)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", choices=["full", "cpu"], default=["full", "cpu"])
    parser.add_argument("--keep", type=Path, help="make the venvs here and keep them (default: deleted)")
    args = parser.parse_args()
    results = {}
    for variant in args.variants:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            results[variant] = measure(variant, args.keep)
        else:
            with tempfile.TemporaryDirectory(prefix=f"install-{variant}-") as tmp:
                results[variant] = measure(variant, Path(tmp))
    rows = list(next(iter(results.values())))
    print(f"\n{'GB (10^9 bytes)':<18}" + "".join(f"{v:>10}" for v in results))
    for row in [*rows, "total"]:
        cells = [sum(r.values()) if row == "total" else r[row] for r in results.values()]
        print(f"{row:<18}" + "".join(f"{c / 1e9:>10.2f}" for c in cells))


if __name__ == "__main__":
    main()
