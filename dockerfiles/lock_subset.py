"""Print the part of the lock file (requirements.txt) that the given packages need, hashes included.

    python dockerfiles/lock_subset.py requirements.txt torch fastapi ... > serving.txt
    python dockerfiles/lock_subset.py --cpu requirements.txt > requirements-cpu.txt

The serving image installs only what serving needs, yet from the one lock: same versions, same hashes. The
dependency closure comes from the lock's own `# via` annotations (uv writes who requires each package), so no
second list of versions exists anywhere. Without packages named, the whole lock is printed.

--cpu leaves out what PyPI's torch uses only on a GPU (README, "Quick start"). The rest of its CUDA libraries
must stay: torch 2.14.1 loads them at import on any machine and fails without them (`libcudnn.so.9: cannot open
shared object file`), while it loads these only if they are there. Install the result with `--no-deps`, since
torch's metadata still names them.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

# Triton compiles GPU kernels (torch.compile, on CUDA); cuda-python and the CUDA toolkit's solver and NVTX
# annotation libraries are opened only when a GPU runs. 1.2 GB of the lock's 6.6 GB install (bench/install.py).
GPU_ONLY = ("triton", "cuda-bindings", "cuda-pathfinder", "cuda-toolkit", "nvidia-cusolver", "nvidia-nvtx")


def parse_lock(text: str) -> dict[str, tuple[str, set[str]]]:
    """name -> (its requirement block without comments, the names of the packages that require it)."""
    packages: dict[str, tuple[str, set[str]]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        head = re.match(r"([A-Za-z0-9][\w.-]*)==", block)
        if not head:
            continue
        lines = block.splitlines()
        requirement = "\n".join(line for line in lines if not line.strip().startswith("#"))
        via = " ".join(line.strip().lstrip("#").strip() for line in lines if line.strip().startswith("#"))
        parents = set(re.sub(r"^via\b", "", via).split()) - {"-r", "requirements.in"}
        packages[head.group(1).lower()] = (requirement, {p.lower() for p in parents})
    return packages


def closure(packages: dict[str, tuple[str, set[str]]], roots: list[str]) -> list[str]:
    unknown = [root for root in roots if root.lower() not in packages]
    if unknown:
        raise SystemExit(f"error: not in the lock: {', '.join(unknown)}")
    chosen = {root.lower() for root in roots}
    grown = True
    while grown:
        grown = False
        for name, (_, parents) in packages.items():
            if name not in chosen and parents & chosen:
                chosen.add(name)
                grown = True
    return sorted(chosen)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="leave out what torch uses only on a GPU")
    parser.add_argument("lock", type=Path, help="the lock file, requirements.txt")
    parser.add_argument("packages", nargs="*", help="roots of the subset (default: the whole lock)")
    args = parser.parse_args(argv)
    packages = parse_lock(args.lock.read_text(encoding="utf-8"))
    names = closure(packages, args.packages) if args.packages else sorted(packages)
    if args.cpu:
        # A dropped name that left the lock would make the CPU install silently bigger: say so instead.
        missing = [name for name in GPU_ONLY if name not in packages]
        if missing:
            raise SystemExit(f"error: {args.lock}: --cpu expects these in the lock: {', '.join(missing)}")
        names = [name for name in names if name not in GPU_ONLY]
    print("\n".join(packages[name][0] for name in names))


if __name__ == "__main__":
    main()
