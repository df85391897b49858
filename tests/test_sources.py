"""Fetching from a local directory and from a real HTTP server on 127.0.0.1: verification, retry, timeouts."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from helpers import QuietHandler, free_port, serve_directory

from oracle_mnist.config import OFFICIAL_SOURCE
from oracle_mnist.errors import OracleMnistError
from oracle_mnist.fsutil import sha256_file
from oracle_mnist.sources import (
    IDX_NAMES,
    OFFICIAL_CHECKSUMS,
    Checksum,
    Limits,
    download,
    fetch_idx,
    fetch_scans,
    parse_sums,
    resolve_local,
    verify,
)


class FlakyHandler(QuietHandler):
    """Answers 503 to the first request for each path, then serves the file."""

    seen: ClassVar[set[str]] = set()

    def do_GET(self):
        if self.path not in self.seen:
            self.seen.add(self.path)
            self.send_error(503, "try again")
            return
        super().do_GET()


@pytest.fixture
def served(tmp_path: Path, sample_dir: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, directory it serves): a temporary copy of the sample behind a real HTTP server."""
    root = tmp_path / "www"
    shutil.copytree(sample_dir, root)
    for path in root.iterdir():
        path.chmod(0o644)
    with serve_directory(root) as url:
        yield url, root


def test_download_verifies_against_the_served_sums(served, tmp_path: Path, sample_dir: Path):
    url, _ = served
    dest = tmp_path / "raw"
    dest.mkdir()
    fetched = fetch_idx(url.rstrip("/"), dest, tmp_path, Limits(timeout=5), retries=1)
    assert sorted(f.name for f in fetched) == sorted(IDX_NAMES)
    assert {f.verified_by for f in fetched} == {"SHA256SUMS sha256"}
    for f in fetched:
        assert f.sha256 == sha256_file(sample_dir / f.name) == sha256_file(dest / f.name)


def test_corrupted_download_is_refused_and_deleted(served, tmp_path: Path):
    url, root = served
    target = root / "train-labels-idx1-ubyte.gz"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    dest = tmp_path / "raw"
    dest.mkdir()
    with pytest.raises(OracleMnistError, match=r"train-labels-idx1-ubyte.gz: checksum mismatch.*SHA256SUMS"):
        fetch_idx(url, dest, tmp_path, Limits(timeout=5), retries=1)
    assert not (dest / "train-labels-idx1-ubyte.gz").exists()


def test_server_without_sums_downloads_unverified(served, tmp_path: Path, capsys):
    url, root = served
    (root / "SHA256SUMS").unlink()
    dest = tmp_path / "raw"
    dest.mkdir()
    fetched = fetch_idx(url, dest, tmp_path, Limits(timeout=5), retries=1)
    assert {f.verified_by for f in fetched} == {"none"}
    assert "serves no SHA256SUMS" in capsys.readouterr().err


class RecordingHandler(QuietHandler):
    """Serves files and records the path of every GET."""

    paths: ClassVar[list[str]] = []

    def do_GET(self):
        self.paths.append(self.path)
        super().do_GET()


def test_missing_file_fails_at_once_with_404(tmp_path: Path, sample_dir: Path):
    root = copy_sample(sample_dir, tmp_path / "www")
    (root / "t10k-images-idx3-ubyte.gz").unlink()
    dest = tmp_path / "raw"
    dest.mkdir()
    RecordingHandler.paths.clear()
    with (
        serve_directory(root, RecordingHandler) as url,
        pytest.raises(OracleMnistError, match=r"t10k-images-idx3-ubyte.gz: HTTP 404"),
    ):
        fetch_idx(url, dest, tmp_path, Limits(timeout=5), retries=3)
    assert RecordingHandler.paths.count("/t10k-images-idx3-ubyte.gz") == 1  # a 404 is not retried


def test_transient_server_errors_are_retried(tmp_path: Path, sample_dir: Path):
    with serve_directory(sample_dir, FlakyHandler) as base:
        dest = tmp_path / "labels.gz"
        download(f"{base}t10k-labels-idx1-ubyte.gz", dest, Limits(timeout=5), retries=2, backoff=0.05)
        assert sha256_file(dest) == sha256_file(sample_dir / "t10k-labels-idx1-ubyte.gz")


def test_unreachable_url_fails_quickly_with_a_clear_message(tmp_path: Path):
    url = f"http://127.0.0.1:{free_port()}/data/"
    start = time.monotonic()
    with pytest.raises(OracleMnistError, match=r"127.0.0.1.*download failed after 2 attempt\(s\).*refused"):
        fetch_idx(url, tmp_path, tmp_path, Limits(timeout=1), retries=2)
    assert time.monotonic() - start < 5
    assert list(tmp_path.iterdir()) == []


def test_silent_server_times_out(tmp_path: Path):
    with socket.socket() as listener:
        # Accepts connections (the kernel backlog) but never answers: only the timeout ends the wait.
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.gz"
        start = time.monotonic()
        with pytest.raises(
            OracleMnistError,
            match=r"x.gz: download failed after 2 attempt\(s\) \(timeout 0.3 s each\): .*timed out",
        ):
            download(url, tmp_path / "x.gz", Limits(timeout=0.3), retries=2, backoff=0.05)
        assert time.monotonic() - start < 3
    assert not (tmp_path / "x.gz").exists()


def copy_sample(sample_dir: Path, dest: Path) -> Path:
    shutil.copytree(sample_dir, dest)
    for path in dest.iterdir():
        path.chmod(0o644)
    return dest


def test_relative_local_source_is_resolved_from_the_params_dir(tmp_path: Path, sample_dir: Path):
    fetched = fetch_idx(sample_dir.name, tmp_path, base_dir=sample_dir.parent)
    assert {f.verified_by for f in fetched} == {"SHA256SUMS sha256"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(IDX_NAMES)


def test_local_checksum_mismatch_is_refused(tmp_path: Path, sample_dir: Path):
    copy = copy_sample(sample_dir, tmp_path / "copy")
    with open(copy / "t10k-images-idx3-ubyte.gz", "ab") as fh:
        fh.write(b"\0")
    dest = tmp_path / "raw"
    dest.mkdir()
    with pytest.raises(
        OracleMnistError,
        match=r"t10k-images-idx3-ubyte.gz: checksum mismatch, sha256 is [0-9a-f]{64} but .*SHA256SUMS says 9afde93e",
    ):
        fetch_idx(str(copy), dest, tmp_path)
    assert not (dest / "t10k-images-idx3-ubyte.gz").exists()


def test_local_sources_without_or_with_incomplete_sums(tmp_path: Path, sample_dir: Path, capsys):
    copy = copy_sample(sample_dir, tmp_path / "copy")
    sums = (copy / "SHA256SUMS").read_text()
    (copy / "SHA256SUMS").write_text(
        "".join(line + "\n" for line in sums.splitlines() if "t10k-labels" not in line)
    )
    (tmp_path / "a").mkdir()
    with pytest.raises(OracleMnistError, match=r"t10k-labels-idx1-ubyte.gz: not listed in .*SHA256SUMS"):
        fetch_idx(str(copy), tmp_path / "a", tmp_path)
    (copy / "SHA256SUMS").unlink()
    (tmp_path / "b").mkdir()
    fetched = fetch_idx(str(copy), tmp_path / "b", tmp_path)
    assert {f.verified_by for f in fetched} == {"none"}
    assert "has no SHA256SUMS" in capsys.readouterr().err
    (copy / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(OracleMnistError, match=r"data.source: .*copy/train-images-idx3-ubyte.gz not found"):
        fetch_idx(str(copy), tmp_path / "b", tmp_path)


def test_bad_source_values_are_refused(tmp_path: Path):
    with pytest.raises(OracleMnistError, match=r"data.source: .*nowhere is not a directory"):
        resolve_local("nowhere", tmp_path)
    with pytest.raises(OracleMnistError, match=r"unsupported URL scheme in 'ftp://host/data'"):
        resolve_local("ftp://host/data", tmp_path)
    with pytest.raises(OracleMnistError, match=r"is a URL, but data.format 'scans' needs a local directory"):
        fetch_scans("https://example.org/scans/", tmp_path, tmp_path)


def test_parse_sums_accepts_sha256sum_output_and_names_bad_lines():
    digest = "ab" * 32
    assert parse_sums(f"{digest}  a.gz\n{digest.upper()} *b.gz\n\n", "S") == {"a.gz": digest, "b.gz": digest}
    with pytest.raises(OracleMnistError, match=r"S: line 2 is not '<sha256>  <name>'"):
        parse_sums(f"{digest}  a.gz\nnot a sum\n", "S")


def test_git_blob_id_verification(tmp_path: Path):
    path = tmp_path / "hello"
    path.write_bytes(b"hello\n")
    # `git hash-object` of "hello\n", a value anyone can reproduce.
    ok = verify(
        path, "hello", Checksum("git-blob", "official", "ce013625030ba8dba906f756967f9e9ca394464a"), "x"
    )
    assert ok.verified_by == "official git-blob" and ok.size == 6
    with pytest.raises(
        OracleMnistError, match=r"hello: checksum mismatch, git-blob is ce0136.* but upstream says 0000"
    ):
        verify(path, "hello", Checksum("git-blob", "official", "0" * 40), "upstream")
    assert not path.exists()


def test_official_sums_do_not_describe_the_sample(sample_dir: Path):
    # Why the official checksums are applied to downloads from the official URL only.
    for name, expected in OFFICIAL_CHECKSUMS.items():
        if expected.kind == "sha256":
            assert sha256_file(sample_dir / name) != expected.value


def test_official_url_is_checked_against_the_upstream_ids(monkeypatch, tmp_path: Path, sample_dir: Path):
    requested = []

    def fake_download(url: str, dest: Path, limits: Limits, retries: int) -> str:
        # Stands in for the network: serves the sample's bytes under the official names.
        requested.append(url)
        shutil.copyfile(sample_dir / url.rsplit("/", 1)[-1], dest)
        return sha256_file(dest)

    monkeypatch.setattr("oracle_mnist.sources.download", fake_download)
    with pytest.raises(
        OracleMnistError,
        match=r"train-images-idx3-ubyte.gz: checksum mismatch, git-blob is [0-9a-f]{40} but the pinned upstream commit says 1f6e3765",
    ):
        fetch_idx(OFFICIAL_SOURCE.rstrip("/"), tmp_path, tmp_path)
    assert requested == [OFFICIAL_SOURCE + "train-images-idx3-ubyte.gz"]  # no SHA256SUMS asked for
    assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def trickle_server(headers: bytes, interval: float, count: int) -> Iterator[tuple[str, dict[str, int]]]:
    """(url, stats): a server that answers every request with `headers`, then one byte every `interval` s,
    `count` bytes in all; stats counts connections and the body bytes it managed to send."""
    stats = {"connections": 0, "sent": 0}
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            stats["connections"] += 1
            with conn, contextlib.suppress(OSError):
                conn.recv(65536)
                conn.sendall(headers)
                for _ in range(count):
                    if stop.wait(interval):
                        break
                    conn.sendall(b"x")
                    stats["sent"] += 1

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/x.gz", stats
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)


def test_a_trickling_server_is_cut_at_the_deadline(tmp_path: Path):
    # Headers, then a byte every 0.2 s: each read succeeds well within the 5 s socket timeout, so only the
    # overall deadline can end it (without one this download would take 40 s).
    headers = b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n"
    with trickle_server(headers, 0.2, 200) as (url, stats):
        with pytest.raises(OracleMnistError, match=r"x.gz: not downloaded within data.download_timeout=1 s"):
            download(url, tmp_path / "x.gz", Limits(timeout=5, deadline=1), retries=3, backoff=0.05)
        sent = stats["sent"]
    assert 0 < sent < 200
    assert stats["connections"] == 1  # the deadline covers the retries too
    assert not (tmp_path / "x.gz").exists()


def test_an_endless_stream_is_cut_at_the_size_ceiling(tmp_path: Path):
    # No Content-Length: the body only ends when the server closes. The ceiling stops it after 11 bytes,
    # so reads must hand over what has arrived instead of waiting for 64 KiB.
    with trickle_server(b"HTTP/1.0 200 OK\r\n\r\n", 0.02, 100_000) as (url, stats):
        with pytest.raises(
            OracleMnistError, match=r"x.gz: 11 bytes or more, over data.max_download_bytes=10"
        ):
            download(url, tmp_path / "x.gz", Limits(timeout=5, deadline=60, max_bytes=10), retries=3)
        assert stats["connections"] == 1  # too big is not worth retrying
    assert not (tmp_path / "x.gz").exists()


def test_a_declared_size_over_the_ceiling_is_refused_before_reading(served, tmp_path: Path):
    url, root = served
    (root / "big.gz").write_bytes(b"\0" * 300_000)
    with pytest.raises(
        OracleMnistError, match=r"big.gz: 300000 bytes or more, over data.max_download_bytes=100000"
    ):
        download(url + "big.gz", tmp_path / "big.gz", Limits(timeout=5, max_bytes=100_000), retries=1)
    assert not (tmp_path / "big.gz").exists()


def test_download_returns_the_sha256_it_computed_while_streaming(served, tmp_path: Path, sample_dir: Path):
    url, _ = served
    digest = download(url + "t10k-labels-idx1-ubyte.gz", tmp_path / "l.gz", Limits(timeout=5), retries=1)
    assert digest == sha256_file(sample_dir / "t10k-labels-idx1-ubyte.gz") == sha256_file(tmp_path / "l.gz")


# --- what a local source may hold: regular files only, bounded, symlinks only inside ----------------------


@pytest.fixture
def bounded_writes() -> Iterator[None]:
    """Files this process writes stop at 64 MiB (Python ignores SIGXFSZ: the write fails with EFBIG), so a
    copy without a bound, the bug these tests look for, fails the test instead of filling the disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def scans_source(root: Path) -> Path:
    """train/<label>/ and test/<label>/ with one file each: copying does not decode them."""
    for split in ("train", "test"):
        for label in range(10):
            (root / split / str(label)).mkdir(parents=True)
            (root / split / str(label) / "0.png").write_bytes(f"{split} {label}".encode())
    return root


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


SCANS_NOT_REGULAR = {
    "fifo": (lambda p: os.mkfifo(p), r"a FIFO \(named pipe\), not a regular file"),
    "device": (
        lambda p: os.symlink("/dev/zero", p),
        r"a character device \(a symlink to /dev/zero\), not a regular file",
    ),
    "loop": (lambda p: os.symlink(p.name, p), r"a symlink loop \(too many levels of symbolic links\)"),
    "dangling": (
        lambda p: os.symlink("gone.png", p),
        r"a dangling symlink \(to gone.png, which does not exist\)",
    ),
}


@pytest.mark.parametrize("case", sorted(SCANS_NOT_REGULAR))
def test_scans_copy_refuses_what_is_not_a_regular_file(case: str, tmp_path: Path, bounded_writes):
    make, problem = SCANS_NOT_REGULAR[case]
    root = scans_source(tmp_path / "repo" / "scans")
    bad = root / "train" / "4" / "1.png"
    make(bad)
    before = listing(root)
    dest = tmp_path / "raw"
    dest.mkdir()
    with pytest.raises(OracleMnistError, match=re.escape(f"{bad}: ") + problem):
        fetch_scans(str(root), dest, tmp_path / "repo")
    assert not (dest / "train" / "4" / "1.png").exists()
    assert listing(root) == before


def test_a_scan_over_the_byte_limit_is_refused_before_copying(tmp_path: Path, bounded_writes):
    root = scans_source(tmp_path / "scans")
    big = root / "test" / "2" / "big.png"
    # Sparse: 2 MiB that cost no disk; max_pixels=1000 allows 8 * 1000 bytes + 1 MiB.
    with open(big, "wb") as fh:
        fh.truncate(2 << 20)
    dest = tmp_path / "raw"
    dest.mkdir()
    with pytest.raises(
        OracleMnistError,
        match=re.escape(f"{big}: {2 << 20} bytes, over the limit of {8000 + (1 << 20)} bytes for a scan ")
        + r"\(8 a pixel of data.max_pixels=1000, plus 1 MiB\); refused before reading it",
    ):
        fetch_scans(str(root), dest, tmp_path, max_pixels=1000)
    assert not (dest / "test" / "2" / "big.png").exists()


def test_symlinked_class_folders_are_followed_inside_the_repository_only(tmp_path: Path):
    repo = tmp_path / "repo"
    root = scans_source(repo / "data" / "sources" / "scans")
    # Inside the repository (a dvc-added folder, say): followed, its files copied under the link's name.
    shutil.move(root / "train" / "3", repo / "cattle")
    (root / "train" / "3").symlink_to(repo / "cattle", target_is_directory=True)
    dest = tmp_path / "raw"
    dest.mkdir()
    fetched = fetch_scans(str(root), dest, repo)
    assert "train/3/0.png" in {f.name for f in fetched}
    assert (dest / "train" / "3" / "0.png").read_bytes() == b"train 3"
    assert not (dest / "train" / "3").is_symlink()
    # Outside both the source and the repository: refused naming the symlink, not skipped.
    shutil.move(repo / "cattle", tmp_path / "cattle")
    (root / "train" / "3").unlink()
    (root / "train" / "3").symlink_to(tmp_path / "cattle", target_is_directory=True)
    with pytest.raises(
        OracleMnistError,
        match=re.escape(f"{root}/train/3: a symlink to {tmp_path.resolve()}/cattle, outside the source"),
    ):
        fetch_scans(str(root), tmp_path / "raw2", repo)


@pytest.mark.parametrize(
    ("link", "target"), [("train/1/up", "../.."), ("train/5", ".."), ("test", ".")], ids=str
)
def test_a_folder_symlink_to_a_folder_that_holds_it_is_refused(tmp_path: Path, link: str, target: str):
    root = scans_source(tmp_path / "scans")
    if (root / link).exists():
        shutil.rmtree(root / link)
    (root / link).symlink_to(target, target_is_directory=True)
    dest = tmp_path / "raw"
    dest.mkdir()
    with pytest.raises(
        OracleMnistError,
        match=re.escape(f"{root / link}: a symlink to ")
        + r".*, a folder that holds the symlink itself \(a loop\)",
    ):
        fetch_scans(str(root), dest, tmp_path)


def test_a_self_looping_source_is_named_as_a_symlink_loop(tmp_path: Path):
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(
        OracleMnistError,
        match=re.escape(f"data.source: {tmp_path}/loop is not a directory (a symlink loop (too many levels"),
    ):
        fetch_scans("loop", tmp_path / "raw", tmp_path)


IDX_NOT_REGULAR = {
    "device": (
        "t10k-labels-idx1-ubyte.gz",
        lambda p: os.symlink("/dev/zero", p),
        r"a character device \(a symlink to /dev/zero\), not a regular file",
    ),
    "fifo-sums": ("SHA256SUMS", lambda p: os.mkfifo(p), r"a FIFO \(named pipe\), not a regular file"),
    "too-big": (
        "train-labels-idx1-ubyte.gz",
        lambda p: os.truncate(p, 2_000_000),  # sparse: no disk
        r"2000000 bytes, over data.max_download_bytes=1000000; refused before reading it",
    ),
}


@pytest.mark.parametrize("case", sorted(IDX_NOT_REGULAR))
def test_idx_copy_refuses_special_and_oversized_files(
    case: str, tmp_path: Path, sample_dir: Path, bounded_writes
):
    name, make, problem = IDX_NOT_REGULAR[case]
    copy = copy_sample(sample_dir, tmp_path / "copy")
    if case != "too-big":
        (copy / name).unlink()
    make(copy / name)
    dest = tmp_path / "raw"
    dest.mkdir()
    with pytest.raises(OracleMnistError, match=re.escape(f"{copy / name}: ") + problem):
        # The sample's largest file holds 999,680 bytes.
        fetch_idx(str(copy), dest, tmp_path, Limits(max_bytes=1_000_000))
    assert not (dest / name).exists()
