"""Readers and writers for the dataset's files: gzip idx, scans trees, the stratified split, feature arrays."""

from __future__ import annotations

import gzip
import json
import math
import os
import sys
import zipfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from oracle_mnist.errors import OracleMnistError
from oracle_mnist.fsutil import atomic_path, read_regular, write_json
from oracle_mnist.images import convert, open_image

J = TypeVar("J")
R = TypeVar("R")

# The official file names; `t10k` is the official test split.
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLITS = ("train", "val", "test")

# idx type code 0x08 is unsigned byte, the only one MNIST-format image and label files use.
_UBYTE = 0x08


# The most data one idx file may declare. The full Oracle-MNIST's largest file holds 21 MB; this leaves room for
# a dataset a hundred times that, and refuses a header declaring more before anything is allocated.
MAX_IDX_BYTES = 2**31


def read_idx(path: str | Path) -> np.ndarray:
    """Read a gzip-compressed idx file into a uint8 array, refusing anything malformed.

    The header is read first and only the data it declares after it (plus one byte, to notice more), so a
    gzip bomb behind a small header costs its declared size at most, never its decompressed size.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as fh:
            magic = fh.read(4)
            ndim = _check_magic(path, magic)
            raw_dims = fh.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise OracleMnistError(
                    f"{path}: idx header truncated ({4 + len(raw_dims)} of {4 + 4 * ndim} bytes)"
                )
            dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))
            expected = math.prod(dims)
            if expected > MAX_IDX_BYTES:
                raise OracleMnistError(
                    f"{path}: idx dimensions {dims} declare {expected} data bytes, over the limit of "
                    f"{MAX_IDX_BYTES} (oracle_mnist.datasets.MAX_IDX_BYTES)"
                )
            data = fh.read(expected)
            extra = fh.read(1)
    except FileNotFoundError:
        raise OracleMnistError(f"{path}: file not found") from None
    except gzip.BadGzipFile as exc:
        raise OracleMnistError(f"{path}: not a gzip file ({exc})") from None
    except (EOFError, zlib.error) as exc:
        raise OracleMnistError(f"{path}: truncated or corrupt gzip data ({exc})") from None
    if len(data) != expected or extra:
        found = "more" if extra else str(len(data))
        raise OracleMnistError(f"{path}: idx dimensions {dims} need {expected} data bytes, file has {found}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims).copy()


def _check_magic(path: Path, magic: bytes) -> int:
    """The number of dimensions an idx header's first 4 bytes declare, or an error naming `path`."""
    if len(magic) < 4:
        raise OracleMnistError(f"{path}: {len(magic)} bytes, too short for an idx header")
    zero0, zero1, dtype, ndim = magic
    if zero0 != 0 or zero1 != 0 or dtype != _UBYTE or ndim == 0:
        raise OracleMnistError(
            f"{path}: wrong idx magic number 0x{magic.hex()} (expected 0x000008NN, unsigned bytes)"
        )
    return ndim


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
    if images.ndim != 3 or images.shape[1] != images.shape[2] or images.shape[1] == 0:
        raise OracleMnistError(
            f"{images_path}: expected square images, idx dimensions (N, S, S), got {images.shape}"
        )
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


def load_features(path: str | Path, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One split's features -> (uint8 (N, S, S) white glyph on black, int64 (N,)); with `num_classes`,
    every label must be one of them."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if {"images", "labels"} - set(npz.files):
                raise OracleMnistError(f"{path}: needs arrays 'images' and 'labels', has {sorted(npz.files)}")
            images, labels = npz["images"], npz["labels"]
    except FileNotFoundError:
        raise OracleMnistError(f"{path}: feature file not found (run `dvc repro featurize`)") from None
    except (OSError, ValueError, zlib.error, EOFError, zipfile.BadZipFile) as exc:
        raise OracleMnistError(f"{path}: not a readable feature file ({exc})") from None
    _check_features(path, images, labels)
    if num_classes is not None and labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise OracleMnistError(f"{path}: labels outside the {num_classes} classes")
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


def scan_items(root: Path, split: str, classes: Sequence[str]) -> list[tuple[str, int]]:
    """The (path relative to root, label) of every image in root/split/<label>/, checked for layout."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise OracleMnistError(f"{split_dir}: missing (a scans tree needs train/<label>/ and test/<label>/)")
    items: list[tuple[str, int]] = []
    counts = [0] * len(classes)
    for entry in sorted(split_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise OracleMnistError(
                f"{entry}: a file outside a class folder (expected {split}/<label>/<image>)"
            )
        label = label_of_folder(entry.name, classes)
        if label is None:
            raise OracleMnistError(
                f"{entry}: unknown class folder {entry.name!r} (expected 0-{len(classes) - 1} or one of {list(classes)})"
            )
        for path in sorted(entry.iterdir()):
            if path.name.startswith("."):
                continue
            # Anything else that is not a regular file (a FIFO, a device) is refused by open_scan, by its kind.
            if path.is_dir():
                raise OracleMnistError(f"{path}: unexpected folder inside a class folder")
            items.append((path.relative_to(root).as_posix(), label))
            counts[label] += 1
    empty = [f"{i} ({classes[i]})" for i, n in enumerate(counts) if n == 0]
    if empty:
        raise OracleMnistError(f"{split_dir}: no images for class(es) {', '.join(empty)}")
    return items


def max_scan_bytes(max_pixels: int) -> int:
    """The most bytes one scan file may hold: 8 a pixel (uncompressed 16-bit RGBA, the widest layout) of the
    largest image `max_pixels` admits, plus 1 MiB of headers and metadata. No image within data.max_pixels
    needs more, so a larger file is refused before it is read or copied: a file never has to be read whole
    to find out it is too big."""
    return 8 * max_pixels + (1 << 20)


def scan_bytes_limit(max_pixels: int) -> str:
    """`max_scan_bytes` as the error messages name it."""
    return f"the limit of {max_scan_bytes(max_pixels)} bytes for a scan (8 a pixel of data.max_pixels={max_pixels}, plus 1 MiB)"


def open_scan(path: Path, min_side: int, max_pixels: int) -> Image.Image:
    """Open and fully decode one scan through `images.open_image` (only a regular file within
    `max_scan_bytes`; empty files, non-images, truncated files and decompression bombs refused, the last
    before any pixel is decompressed), then refuse tiny images."""
    data = read_regular(path, max_scan_bytes(max_pixels), scan_bytes_limit(max_pixels))
    img = open_image(data, str(path), max_pixels, limit_name="data.max_pixels")
    w, h = img.size
    if min(w, h) < min_side:
        raise OracleMnistError(f"{path}: {w}x{h} is smaller than data.min_side={min_side} pixels")
    return img


def _check_one(args: tuple[Path, int, int]) -> tuple[int, int]:
    path, min_side, max_pixels = args
    with open_scan(path, min_side, max_pixels) as img:
        return img.size


def _convert_one(args: tuple[Path, int, int, int]) -> np.ndarray:
    path, size, min_side, max_pixels = args
    with open_scan(path, min_side, max_pixels) as img:
        try:
            return convert(img, size)
        except OracleMnistError as exc:
            raise OracleMnistError(f"{path}: {exc}") from None


def check_scans(
    paths: Sequence[Path], min_side: int, max_pixels: int, desc: str = "check"
) -> list[tuple[int, int]]:
    """Decode every scan (all cores); returns the (width, height) of each, in order."""
    return _parallel(_check_one, [(p, min_side, max_pixels) for p in paths], desc)


def convert_scans(
    paths: Sequence[Path], size: int, min_side: int, max_pixels: int, desc: str = "convert"
) -> np.ndarray:
    """images.convert over many scan files (all cores) -> uint8 (N, size, size)."""
    out = _parallel(_convert_one, [(p, size, min_side, max_pixels) for p in paths], desc)
    return np.stack(out) if out else np.zeros((0, size, size), dtype=np.uint8)


def workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _parallel(fn: Callable[[J], R], jobs: list[J], desc: str) -> list[R]:
    n = workers()
    with tqdm(total=len(jobs), desc=desc, unit="img", file=sys.stderr, leave=False) as bar:
        if n == 1 or len(jobs) < 64:
            return [_tick(bar, fn(job)) for job in jobs]
        pool = ProcessPoolExecutor(max_workers=n)
        try:
            return [
                _tick(bar, r) for r in pool.map(fn, jobs, chunksize=max(1, min(256, len(jobs) // (n * 8))))
            ]
        finally:
            # On the first bad file, drop the queued work instead of decoding the rest of the tree.
            pool.shutdown(cancel_futures=True)


def _tick(bar: tqdm, value: R) -> R:
    bar.update(1)
    return value


def split_idx(
    raw: Path, classes: Sequence[str], val_fraction: float, seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The official idx files in `raw` -> {train, val, test: (images, labels)}, val stratified from train;
    every class must have images in every split (as for scans)."""
    splits = {}
    for split, (images_name, labels_name) in IDX_FILES.items():
        splits[split] = read_idx_split(raw / images_name, raw / labels_name, len(classes))
    images, labels = splits["train"]
    train, val = stratified_split(labels, val_fraction, seed)
    out = {
        "train": (images[train], labels[train]),
        "val": (images[val], labels[val]),
        "test": splits["test"],
    }
    for split, (_, split_labels) in out.items():
        _check_every_class(
            raw / IDX_FILES["test" if split == "test" else "train"][1], split, split_labels, classes
        )
    return out


def _check_every_class(labels_path: Path, split: str, labels: np.ndarray, classes: Sequence[str]) -> None:
    empty = [f"{i} ({classes[i]})" for i, n in enumerate(class_counts(labels, len(classes))) if n == 0]
    if empty:
        why = (
            f" (val takes data.val_fraction of each class from {labels_path.name})" if split == "val" else ""
        )
        raise OracleMnistError(f"{labels_path}: no images for class(es) {', '.join(empty)} in {split}{why}")


def split_scans(
    raw: Path, classes: Sequence[str], val_fraction: float, seed: int, min_side: int, max_pixels: int
) -> dict[str, list[tuple[str, int]]]:
    """A scans tree in `raw` -> {train, val, test: [(relative path, label)]}, every file decoded once."""
    found = {split: scan_items(raw, split, classes) for split in ("train", "test")}
    for split, items in found.items():
        check_scans([raw / path for path, _ in items], min_side, max_pixels, desc=f"check {split}")
    train_items = found["train"]
    train, val = stratified_split(np.array([label for _, label in train_items]), val_fraction, seed)
    return {
        "train": [train_items[i] for i in train],
        "val": [train_items[i] for i in val],
        "test": found["test"],
    }


def save_manifest(path: Path, items: Sequence[tuple[str, int]]) -> None:
    write_json(path, [{"path": name, "label": label} for name, label in items])


def load_manifest(path: Path, num_classes: int) -> list[tuple[str, int]]:
    """A scans split manifest -> [(path relative to data/raw, label)]."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        items = [(str(e["path"]), int(e["label"])) for e in entries]
    except FileNotFoundError:
        raise OracleMnistError(f"{path}: manifest not found (run `dvc repro prepare`)") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise OracleMnistError(f"{path}: not a scans manifest ({exc})") from None
    bad = [name for name, label in items if not 0 <= label < num_classes]
    if bad:
        raise OracleMnistError(f"{path}: label outside the {num_classes} classes for {bad[0]}")
    # prepare writes paths inside data/raw; an edited manifest must not make featurize read files elsewhere.
    outside = [name for name, _ in items if Path(name).is_absolute() or ".." in Path(name).parts]
    if outside:
        raise OracleMnistError(f"{path}: path {outside[0]!r} leads outside data/raw")
    return items
