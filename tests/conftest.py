"""Fixtures shared by all test modules: the real sample, a throwaway copy of the repository, saved models.
Plain functions the tests share live in helpers.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, SAMPLE_DIR, dvc, make_repo_copy

# Set before anything imports timm/huggingface_hub/dvc, and inherited by every subprocess: a mistaken hub
# download fails at once instead of hanging, and dvc never phones home from tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
# pytest-xdist (addopts: -n auto) runs a worker per core: one torch thread each, or the OpenMP threads of two
# workers spin against each other on the same cores (measured here: the fast tier took 82 s with two threads a
# worker, 53 s with one). Tests and stages that need a thread count set it themselves.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real Oracle-MNIST sample (2,000 train / 400 test images, idx format), never modified."""
    if not (SAMPLE_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"Oracle-MNIST sample not found at {SAMPLE_DIR}")
    return SAMPLE_DIR


@pytest.fixture
def repo_copy(tmp_path: Path, sample_dir: Path) -> Path:
    """A git+dvc copy of this repository's committed-or-new files (no DVC outputs, no caches), with
    params pointing at the real sample and shrunken by TEST_PARAMS, committed as its first commit."""
    return make_repo_copy(tmp_path / "repo", sample_dir)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Path:
    """One shrunken `dvc repro` of the whole pipeline, shared read-only by the modules that inspect its outputs
    (train, serving); a test that changes it works on a copy."""
    repo = make_repo_copy(tmp_path_factory.mktemp("pipeline") / "repo", sample_dir)
    dvc(repo, "repro", timeout=900)
    return repo


@pytest.fixture
def clone(pipeline: Path, tmp_path: Path) -> Path:
    """A writable copy of the session's `pipeline` run (outputs, cache, git), for a test that changes it."""
    return Path(shutil.copytree(pipeline, tmp_path / "repo", symlinks=True))


@pytest.fixture(scope="session")
def sample_test_images(sample_dir: Path) -> tuple[Any, Any]:
    """The sample's 400 real test images (uint8 (N, 28, 28), white glyph on black) and labels."""
    from oracle_mnist.datasets import IDX_FILES, read_idx_split

    images_name, labels_name = IDX_FILES["test"]
    return read_idx_split(sample_dir / images_name, sample_dir / labels_name, 10)


@pytest.fixture(scope="session")
def model_file(tmp_path_factory: pytest.TempPathFactory, sample_test_images: tuple[Any, Any]) -> Path:
    """A saved resnet18 (28x28 inputs, the 10 classes) with seeded random weights, its
    BatchNorm statistics taken from real images so its outputs depend on the input. Untrained: for tests of
    the plumbing, not of accuracy."""
    import torch

    from oracle_mnist.config import load_params
    from oracle_mnist.images import to_tensor
    from oracle_mnist.models import ModelMeta, build_model, save_model

    params = load_params(REPO / "params.yaml")
    images, _ = sample_test_images
    torch.manual_seed(0)
    model = build_model("resnet18", params.num_classes, 28)
    meta = ModelMeta(
        model_name="resnet18",
        class_names=params.classes,
        image_size=28,
        mean=float(images.mean() / 255),
        std=float(images.std() / 255),
        data_hash="test-data-hash",
        params_hash="test-params-hash",
        metrics={"val_accuracy": 0.5},
        epoch=1,
    )
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration pass
    model.train()
    with torch.no_grad():
        model(to_tensor(images, meta.mean, meta.std))
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(path, model.eval(), meta)
    return path


@pytest.fixture(scope="session")
def calibrated_model_file(model_file: Path) -> Path:
    """`model_file` with temperature 2 in its metadata: its served probabilities are softmax(logits / 2)."""
    from dataclasses import replace

    from oracle_mnist.models import load_model, save_model

    model, meta = load_model(model_file)
    path = model_file.with_name("calibrated.pt")
    save_model(path, model, replace(meta, temperature=2.0))
    return path


@pytest.fixture(scope="session")
def onnx_model_file(calibrated_model_file: Path) -> Path:
    """`calibrated_model_file` exported to ONNX by the export stage's library function (one export serves every
    ONNX test: 4-5 s each here)."""
    from oracle_mnist.export import export_onnx
    from oracle_mnist.models import load_model

    model, meta = load_model(calibrated_model_file)
    path = calibrated_model_file.with_name("calibrated.onnx")
    export_onnx(model, meta, path)
    return path


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Each xdist worker builds its own session fixtures: the tests of the shared `dvc repro` go to one worker
    # (--dist loadgroup), so it runs once.
    for item in items:
        if "pipeline" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("pipeline"))
