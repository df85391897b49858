"""Idx reader/writer, the stratified split and feature files, on hand-made arrays and the real sample."""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import re
import shutil
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import png_bomb
from PIL import Image

from oracle_mnist.datasets import (
    class_counts,
    convert_scans,
    label_of_folder,
    load_features,
    load_manifest,
    open_scan,
    read_idx,
    read_idx_split,
    save_features,
    save_manifest,
    scan_items,
    split_idx,
    split_scans,
    stratified_split,
    write_idx,
)
from oracle_mnist.errors import OracleMnistError

CLASSES = ("big", "sun", "moon", "cattle", "next", "field", "not", "arrow", "time", "wood")


def test_idx_round_trip_is_exact_and_deterministic(tmp_path: Path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", images)
    write_idx(tmp_path / "b.gz", images)
    back = read_idx(tmp_path / "a.gz")
    assert back.dtype == np.uint8 and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, images)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()
    raw = gzip.decompress((tmp_path / "a.gz").read_bytes())
    assert raw[:16] == bytes.fromhex("00000803000000020000000300000004")


def test_read_idx_reads_the_real_sample(sample_dir: Path):
    images, labels = read_idx_split(
        sample_dir / "train-images-idx3-ubyte.gz", sample_dir / "train-labels-idx1-ubyte.gz", 10
    )
    assert images.shape == (2000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert class_counts(labels, 10) == [200] * 10


def test_not_gzip_is_refused(tmp_path: Path):
    path = tmp_path / "x-images-idx3-ubyte.gz"
    path.write_bytes(b"\x00\x00\x08\x03 not gzip at all")
    with pytest.raises(OracleMnistError, match=r"x-images-idx3-ubyte.gz: not a gzip file"):
        read_idx(path)


def test_truncated_gzip_is_refused(tmp_path: Path, sample_dir: Path):
    data = (sample_dir / "t10k-images-idx3-ubyte.gz").read_bytes()
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OracleMnistError, match=r"t10k-images-idx3-ubyte.gz: truncated or corrupt gzip"):
        read_idx(path)


def test_wrong_magic_is_refused(tmp_path: Path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(bytes.fromhex("00000d01") + b"\x00\x00\x00\x01" + b"\x00" * 4))
    with pytest.raises(OracleMnistError, match=r"bad.gz: wrong idx magic number 0x00000d01"):
        read_idx(path)


def test_dimensions_not_matching_payload_are_refused(tmp_path: Path):
    path = tmp_path / "short.gz"
    header = bytes.fromhex("00000803") + np.asarray([3, 2, 2], dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(header + b"\x00" * 11))
    with pytest.raises(
        OracleMnistError, match=r"short.gz: idx dimensions \(3, 2, 2\) need 12 data bytes, file has 11"
    ):
        read_idx(path)


def test_a_declared_size_over_the_limit_is_refused_before_reading(tmp_path: Path):
    path = tmp_path / "huge.gz"
    header = bytes.fromhex("00000803") + np.asarray([2**20, 2**10, 2**10], dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(header))
    with pytest.raises(
        OracleMnistError, match=r"huge.gz: idx dimensions \(1048576, 1024, 1024\) declare .* over"
    ):
        read_idx(path)


def test_a_gzip_bomb_behind_a_small_header_is_refused_without_inflating_it(tmp_path: Path):
    """64 MB of zeros (64 kB compressed) after a header declaring one 28x28 image."""
    path = tmp_path / "bomb-images-idx3-ubyte.gz"
    with gzip.GzipFile(path, "wb", compresslevel=1) as gz:
        gz.write(bytes.fromhex("00000803") + np.asarray([1, 28, 28], dtype=">u4").tobytes())
        zeros = bytes(2**20)
        for _ in range(64):
            gz.write(zeros)
    tracemalloc.start()
    try:
        with pytest.raises(
            OracleMnistError, match=r"bomb-images-idx3-ubyte.gz: .* need 784 data bytes, file has more"
        ):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20


def test_image_files_must_hold_square_images(tmp_path: Path):
    write_idx(tmp_path / "images.gz", np.zeros((2, 28, 20), dtype=np.uint8))
    write_idx(tmp_path / "labels.gz", np.array([0, 1], dtype=np.uint8))
    with pytest.raises(
        OracleMnistError,
        match=r"images.gz: expected square images, idx dimensions \(N, S, S\), got \(2, 28, 20\)",
    ):
        read_idx_split(tmp_path / "images.gz", tmp_path / "labels.gz", 10)


def test_count_mismatch_and_label_range_are_refused(tmp_path: Path):
    write_idx(tmp_path / "images.gz", np.zeros((3, 2, 2), dtype=np.uint8))
    write_idx(tmp_path / "labels.gz", np.array([0, 1], dtype=np.uint8))
    with pytest.raises(OracleMnistError, match=r"images.gz: 3 images but labels.gz has 2 labels"):
        read_idx_split(tmp_path / "images.gz", tmp_path / "labels.gz", 10)
    write_idx(tmp_path / "labels.gz", np.array([0, 10, 2], dtype=np.uint8))
    with pytest.raises(OracleMnistError, match=r"labels.gz: label 10 at index 1 is outside the 10 classes"):
        read_idx_split(tmp_path / "images.gz", tmp_path / "labels.gz", 10)


def test_stratified_split_is_deterministic_and_stratified():
    labels = np.repeat(np.arange(10), [200, 200, 200, 200, 200, 200, 200, 200, 30, 7])
    train, val = stratified_split(labels, 0.1, seed=42)
    again_train, again_val = stratified_split(labels, 0.1, seed=42)
    np.testing.assert_array_equal(val, again_val)
    np.testing.assert_array_equal(train, again_train)
    assert class_counts(labels[val], 10) == [20] * 8 + [3, 1]
    assert len(train) + len(val) == len(labels)
    assert not set(train) & set(val)
    _, other_val = stratified_split(labels, 0.1, seed=43)
    assert not np.array_equal(val, other_val)


def test_split_of_one_class_does_not_depend_on_the_others():
    labels = np.repeat(np.arange(3), [50, 50, 50])
    _, val = stratified_split(labels, 0.2, seed=1)
    more = np.concatenate([labels, np.full(40, 2)])
    _, val_more = stratified_split(more, 0.2, seed=1)
    np.testing.assert_array_equal(val[labels[val] == 0], val_more[more[val_more] == 0])


def test_features_round_trip(tmp_path: Path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4])
    save_features(tmp_path / "train.npz", images, labels)
    got_images, got_labels = load_features(tmp_path / "train.npz")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_labels.dtype == np.int64
    assert [p.name for p in tmp_path.iterdir()] == ["train.npz"]


def test_bad_feature_files_are_refused(tmp_path: Path):
    with pytest.raises(OracleMnistError, match=r"missing.npz: feature file not found"):
        load_features(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(OracleMnistError, match=r"junk.npz: not a readable feature file"):
        load_features(tmp_path / "junk.npz")
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 4, 4)), labels=np.zeros(2, dtype=np.int64))
    with pytest.raises(OracleMnistError, match=r"float.npz: images must be uint8"):
        load_features(tmp_path / "float.npz")
    with pytest.raises(OracleMnistError, match=r"labels must be integers \(N,\) matching 2 images"):
        save_features(tmp_path / "x.npz", np.zeros((2, 4, 4), np.uint8), np.zeros(3, np.int64))
    assert not (tmp_path / "x.npz").exists()


def corrupt_npz(path: Path) -> Path:
    """Flip one byte inside the stored 'images' array: the zip's CRC-32 no longer matches."""
    save_features(path, np.full((4, 8, 8), 7, np.uint8), np.arange(4))
    data = bytearray(path.read_bytes())
    data[data.index(bytes([7] * 64)) + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def test_feature_file_with_a_crc_error_is_refused(tmp_path: Path):
    corrupt_npz(tmp_path / "train.npz")
    with pytest.raises(OracleMnistError, match=r"train.npz: not a readable feature file \(Bad CRC-32"):
        load_features(tmp_path / "train.npz")


def test_split_idx_needs_every_class_in_every_split(tmp_path: Path, sample_dir: Path):
    for name in sample_dir.glob("*.gz"):
        shutil.copyfile(name, tmp_path / name.name)
    labels_path = tmp_path / "train-labels-idx1-ubyte.gz"
    labels = read_idx(labels_path)
    write_idx(labels_path, np.where(labels == 3, 4, labels).astype(np.uint8))
    with pytest.raises(
        OracleMnistError, match=rf"{labels_path}: no images for class\(es\) 3 \(cattle\) in train"
    ):
        split_idx(tmp_path, CLASSES, 0.1, 0)
    # One image of class 5 left: round(0.1 * 1) = 0 of it goes to val.
    labels = np.where(labels == 5, 6, labels)
    labels[np.flatnonzero(read_idx(sample_dir / "train-labels-idx1-ubyte.gz") == 5)[0]] = 5
    write_idx(labels_path, labels.astype(np.uint8))
    with pytest.raises(OracleMnistError, match=r"no images for class\(es\) 5 \(field\) in val \(val takes"):
        split_idx(tmp_path, CLASSES, 0.1, 0)
    test_labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    write_idx(labels_path, read_idx(sample_dir / "train-labels-idx1-ubyte.gz"))
    write_idx(test_labels, np.where(read_idx(test_labels) == 9, 0, read_idx(test_labels)).astype(np.uint8))
    with pytest.raises(
        OracleMnistError, match=rf"{test_labels}: no images for class\(es\) 9 \(wood\) in test"
    ):
        split_idx(tmp_path, CLASSES, 0.1, 0)


def test_load_features_checks_labels_against_the_classes(tmp_path: Path):
    save_features(tmp_path / "test.npz", np.zeros((3, 4, 4), np.uint8), np.array([0, 9, 10]))
    assert load_features(tmp_path / "test.npz", 11)[1].tolist() == [0, 9, 10]
    with pytest.raises(OracleMnistError, match=r"test.npz: labels outside the 10 classes"):
        load_features(tmp_path / "test.npz", 10)


def test_label_of_folder_accepts_numbers_and_names():
    assert label_of_folder("3", CLASSES) == 3
    assert label_of_folder("wood", CLASSES) == 9
    assert label_of_folder("10", CLASSES) is None
    assert label_of_folder("03", CLASSES) is None
    assert label_of_folder("dragon", CLASSES) is None


def scans_tree(root: Path, per_class: int = 2, size: int = 32) -> Path:
    for split in ("train", "test"):
        for label in range(10):
            (root / split / str(label)).mkdir(parents=True)
            for i in range(per_class):
                img = np.full((size, size + i), 255, dtype=np.uint8)
                img[size // 4 : -size // 4, size // 2 - 2 : size // 2 + 2] = label * 10
                Image.fromarray(img).save(root / split / str(label) / f"{i}.png")
    return root


def test_scan_items_reads_the_layout_by_number_or_name(tmp_path: Path):
    root = scans_tree(tmp_path / "scans")
    (root / "train" / "3").rename(root / "train" / "cattle")
    (root / "train" / "cattle" / ".DS_Store").write_bytes(b"litter")
    items = scan_items(root, "train", CLASSES)
    assert len(items) == 20
    assert ("train/cattle/0.png", 3) in items and ("train/0/1.png", 0) in items
    assert all(not name.endswith(".DS_Store") for name, _ in items)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda r: (r / "train" / "dragon").mkdir(), r"train/dragon: unknown class folder 'dragon'"),
        (lambda r: shutil.rmtree(r / "train" / "7"), r"train: no images for class\(es\) 7 \(arrow\)"),
        (
            lambda r: (r / "train" / "loose.png").write_bytes(b""),
            r"train/loose.png: a file outside a class folder",
        ),
        (
            lambda r: (r / "train" / "1" / "sub").mkdir(),
            r"train/1/sub: unexpected folder inside a class folder",
        ),
        (lambda r: shutil.rmtree(r / "train"), r"train: missing"),
    ],
)
def test_scan_items_refuses_bad_layouts(tmp_path: Path, breakage, message):
    root = scans_tree(tmp_path / "scans")
    breakage(root)
    with pytest.raises(OracleMnistError, match=message):
        scan_items(root, "train", CLASSES)


def test_open_scan_refuses_bad_files(tmp_path: Path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(OracleMnistError, match=r"empty.png: empty file \(0 bytes\)"):
        open_scan(tmp_path / "empty.png", 16, 40_000_000)
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(OracleMnistError, match=r"notes.jpg: not an image file Pillow can read"):
        open_scan(tmp_path / "notes.jpg", 16, 40_000_000)
    Image.new("L", (64, 64), 128).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(OracleMnistError, match=r"cut.png: truncated or corrupt image"):
        open_scan(tmp_path / "cut.png", 16, 40_000_000)
    Image.new("L", (40, 10)).save(tmp_path / "thin.png")
    with pytest.raises(OracleMnistError, match=r"thin.png: 40x10 is smaller than data.min_side=16"):
        open_scan(tmp_path / "thin.png", 16, 40_000_000)


def test_open_scan_refuses_decompression_bombs_before_decoding(tmp_path: Path):
    bomb = png_bomb(tmp_path / "bomb.png", 10_000, 10_000)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(
        OracleMnistError,
        match=r"bomb.png: 10000x10000 = 100000000 pixels is over data.max_pixels=40000000",
    ):
        open_scan(bomb, 16, 40_000_000)
    # Beyond twice Pillow's own limit, Pillow refuses at open; the message still names the file.
    huge = png_bomb(tmp_path / "huge.png", 20_000, 20_000)
    with pytest.raises(OracleMnistError, match=r"huge.png: refused as a decompression bomb"):
        open_scan(huge, 16, 10**12)


def test_split_scans_and_convert_scans(tmp_path: Path):
    root = scans_tree(tmp_path / "scans", per_class=10)
    manifests = split_scans(root, CLASSES, 0.2, 42, 16, 40_000_000)
    assert [len(manifests[s]) for s in ("train", "val", "test")] == [80, 20, 100]
    assert class_counts(np.array([label for _, label in manifests["val"]]), 10) == [2] * 10
    assert manifests == split_scans(root, CLASSES, 0.2, 42, 16, 40_000_000)
    paths = [root / name for name, _ in manifests["test"]]
    images = convert_scans(paths, 20, 16, 40_000_000)
    assert images.shape == (100, 20, 20) and images.dtype == np.uint8
    # Dark bar on white -> bright vertical bar on black, in the middle column.
    assert images[:, 6:14, 7:13].max(axis=2).min() > 120 and images[:, :, :5].max() < 30
    save_manifest(tmp_path / "m.json", manifests["test"])
    assert load_manifest(tmp_path / "m.json", 10) == manifests["test"]
    (tmp_path / "bad.json").write_text('[{"path": "x.png"}]')
    with pytest.raises(OracleMnistError, match=r"bad.json: not a scans manifest"):
        load_manifest(tmp_path / "bad.json", 10)
    for escape in ("/etc/passwd", "../../secret.png", "big/../../x.png"):
        (tmp_path / "escape.json").write_text(json.dumps([{"path": escape, "label": 0}]))
        with pytest.raises(
            OracleMnistError, match=rf"escape.json: path '{re.escape(escape)}' leads outside data/raw"
        ):
            load_manifest(tmp_path / "escape.json", 10)


@contextlib.contextmanager
def fifo_writer(fifo: Path) -> Iterator[None]:
    """Opens `fifo` for writing, and closes it at once, as soon as a reader has it open: a reader that should
    never have opened it (the bug under test) then reads end of file instead of waiting for ever."""
    stop = threading.Event()

    def unblock() -> None:
        while not stop.wait(0.01):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                return
            except OSError as exc:  # ENXIO: no reader yet
                if exc.errno != errno.ENXIO:
                    raise

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_open_scan_reads_regular_files_only_and_bounds_their_size(tmp_path: Path):
    os.mkfifo(tmp_path / "pipe.png")
    with (
        fifo_writer(tmp_path / "pipe.png"),
        pytest.raises(OracleMnistError, match=r"pipe.png: a FIFO \(named pipe\), not a regular file"),
    ):
        open_scan(tmp_path / "pipe.png", 16, 40_000_000)
    limit = 8 * 1000 + (1 << 20)  # 8 bytes a pixel of max_pixels, plus 1 MiB
    with open(tmp_path / "big.png", "wb") as fh:
        fh.truncate(limit + 1)  # sparse: costs no disk
    with pytest.raises(
        OracleMnistError,
        match=rf"big.png: {limit + 1} bytes, over the limit of {limit} bytes "
        r"for a scan \(8 a pixel of data.max_pixels=1000, plus 1 MiB\); refused before reading it",
    ):
        open_scan(tmp_path / "big.png", 16, 1000)


def test_split_scans_names_a_fifo_as_such(tmp_path: Path):
    root = scans_tree(tmp_path / "scans")
    os.mkfifo(root / "test" / "6" / "pipe.png")
    with (
        fifo_writer(root / "test" / "6" / "pipe.png"),
        pytest.raises(OracleMnistError, match=r"test/6/pipe.png: a FIFO \(named pipe\), not a regular file"),
    ):
        split_scans(root, CLASSES, 0.2, 42, 16, 40_000_000)
