"""Print the part of the lock file (requirements.txt) that the given packages need, hashes included.

    python dockerfiles/lock_subset.py requirements.txt torch fastapi ... > serving.txt

The serving image installs only what serving needs, yet from the one lock: same versions, same hashes. The
dependency closure comes from the lock's own `# via` annotations (uv writes who requires each package), so no
second list of versions exists anywhere.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


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


def main(argv: list[str]) -> None:
    lock, *roots = argv
    packages = parse_lock(Path(lock).read_text(encoding="utf-8"))
    print("\n".join(packages[name][0] for name in closure(packages, roots)))


if __name__ == "__main__":
    main(sys.argv[1:])
