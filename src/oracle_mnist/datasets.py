"""Readers and writers for the dataset's files: gzip idx, scans trees, the stratified split, feature arrays."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from oracle_mnist.errors import OracleMnistError
from oracle_mnist.fsutil import atomic_path

# The official file names; `t10k` is the official test split.
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLITS = ("train", "val", "test")

# idx type code 0x08 is unsigned byte, the only one MNIST-format image and label files use.
_UBYTE = 0x08


def read_idx(path: str | Path) -> np.ndarray:
    """Read a gzip-compressed idx file into a uint8 array, refusing anything malformed."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise OracleMnistError(f"{path}: file not found") from None
    except gzip.BadGzipFile as exc:
        raise OracleMnistError(f"{path}: not a gzip file ({exc})") from None
    except (EOFError, zlib.error) as exc:
        raise OracleMnistError(f"{path}: truncated or corrupt gzip data ({exc})") from None
    if len(data) < 4:
        raise OracleMnistError(f"{path}: {len(data)} bytes, too short for an idx header")
    zero0, zero1, dtype, ndim = data[:4]
    if zero0 != 0 or zero1 != 0 or dtype != _UBYTE or ndim == 0:
        raise OracleMnistError(
            f"{path}: wrong idx magic number 0x{data[:4].hex()} (expected 0x000008NN, unsigned bytes)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise OracleMnistError(f"{path}: idx header truncated ({len(data)} of {header} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise OracleMnistError(
            f"{path}: idx dimensions {dims} need {expected} data bytes, file has {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip idx file (atomically, byte-identical for identical arrays)."""
    if array.dtype != np.uint8 or not 1 <= array.ndim <= 255:
        raise OracleMnistError(f"{path}: idx needs a uint8 array with 1-255 dimensions, got {array.dtype}")
    header = bytes([0, 0, _UBYTE, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with (
        atomic_path(path) as tmp,
        open(tmp, "wb") as raw,
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz,
    ):
        gz.write(header)
        gz.write(np.ascontiguousarray(array).tobytes())


def read_idx_split(images_path: Path, labels_path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One split's image and label files -> (uint8 (N, H, W), int64 (N,)), checked against each other."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise OracleMnistError(f"{images_path}: expected 3 idx dimensions (N, H, W), got {images.shape}")
    if labels.ndim != 1:
        raise OracleMnistError(f"{labels_path}: expected 1 idx dimension (N,), got {labels.shape}")
    if len(images) != len(labels):
        raise OracleMnistError(
            f"{images_path}: {len(images)} images but {labels_path.name} has {len(labels)} labels"
        )
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        raise OracleMnistError(
            f"{labels_path}: label {int(labels[bad[0]])} at index {int(bad[0])} is outside the "
            f"{num_classes} classes (0-{num_classes - 1}); {bad.size} such label(s)"
        )
    return images, labels.astype(np.int64)


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(labels, minlength=num_classes)[:num_classes].tolist()


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), each sorted: round(val_fraction * n_c) of every class c goes to val.

    Each class is shuffled by its own generator seeded from (seed, class), so one class's draw does not
    depend on how many images the other classes have.
    """
    if not 0.0 < val_fraction < 1.0:
        raise OracleMnistError(f"val_fraction must be in (0, 1), got {val_fraction}")
    val_parts = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n_val = round(val_fraction * len(members))
        rng = np.random.default_rng([seed, int(cls)])
        val_parts.append(rng.permutation(members)[:n_val])
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val, assume_unique=True)
    return train, val


def save_features(path: str | Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write one split's features (uncompressed npz: uint8 is compact already and loads fastest)."""
    _check_features(Path(path), images, labels)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, images=images, labels=labels.astype(np.int64))


def load_features(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One split's features -> (uint8 (N, S, S) white glyph on black, int64 (N,))."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if {"images", "labels"} - set(npz.files):
                raise OracleMnistError(f"{path}: needs arrays 'images' and 'labels', has {sorted(npz.files)}")
            images, labels = npz["images"], npz["labels"]
    except FileNotFoundError:
        raise OracleMnistError(f"{path}: feature file not found (run `dvc repro featurize`)") from None
    except (OSError, ValueError, zlib.error, EOFError) as exc:
        raise OracleMnistError(f"{path}: not a readable feature file ({exc})") from None
    _check_features(path, images, labels)
    return images, labels


def _check_features(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise OracleMnistError(f"{path}: images must be uint8 (N, S, S), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise OracleMnistError(
            f"{path}: labels must be integers (N,) matching {len(images)} images, got {labels.dtype} {labels.shape}"
        )


def label_of_folder(name: str, classes: Sequence[str]) -> int | None:
    """A scans class folder is named by its label number or its class name; None if it is neither."""
    if name.isdigit() and int(name) < len(classes) and str(int(name)) == name:
        return int(name)
    return classes.index(name) if name in classes else None
