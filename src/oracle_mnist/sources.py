"""Fetch the raw dataset files from an http(s) base URL or a local directory, verified before use.

What a file is checked against depends on where it comes from:
- the official URL (config.OFFICIAL_SOURCE): the upstream sha256, or for the training images, whose sha256
  cannot be seen from here, the upstream git blob id;
- any other URL or directory: the SHA256SUMS file beside the data, when there is one. The official sums are
  not applied there, because a mirror or a sample (like the one shipped for offline work) holds other bytes
  under the same names.
A file that fails is deleted and the fetch raises; the caller writes into a temporary directory, so nothing
unverified ever reaches data/raw.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import os
import socket
import stat
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from oracle_mnist.config import OFFICIAL_SOURCE, DataConfig
from oracle_mnist.datasets import IDX_FILES, max_scan_bytes, scan_bytes_limit
from oracle_mnist.errors import OracleMnistError
from oracle_mnist.fsutil import (
    check_regular,
    copy_regular,
    file_kind,
    git_blob_file,
    os_problem,
    read_regular,
    sha256_file,
    stat_path,
)

IDX_NAMES = tuple(name for pair in IDX_FILES.values() for name in pair)
SUMS_FILE = "SHA256SUMS"
# A checksum list is text, small: a large one is not one.
MAX_SUMS_BYTES = 1 << 20


class NotFoundError(OracleMnistError):
    """The server has no such file (HTTP 404): not worth retrying."""


@dataclass(frozen=True)
class Checksum:
    kind: str  # "sha256" or "git-blob"
    origin: str  # where the expected value comes from: "official" or "SHA256SUMS"
    value: str


# Upstream wm-bupt/oracle-mnist at the pinned commit (data/sources/oracle-mnist-sample/README.md).
OFFICIAL_CHECKSUMS: dict[str, Checksum] = {
    "t10k-images-idx3-ubyte.gz": Checksum(
        "sha256", "official", "ca5e631c21fdbf452f2af8cb410d8546456b4b9820881b8d77150767496bf099"
    ),
    "t10k-labels-idx1-ubyte.gz": Checksum(
        "sha256", "official", "e10758deebac47b5ce0a1fe87cea09d50cb797544ed7b7dbac61e5f709c074b0"
    ),
    "train-labels-idx1-ubyte.gz": Checksum(
        "sha256", "official", "45c65b236f8e169e6bd0875270d84cb132753351ca1938ae7935523ebd1e95fc"
    ),
    "train-images-idx3-ubyte.gz": Checksum(
        "git-blob", "official", "1f6e37653511386c87fc954b27b0770ccdd19b02"
    ),
}


@dataclass(frozen=True)
class FetchedFile:
    name: str  # path relative to the destination directory
    sha256: str
    size: int
    verified_by: str  # what the bytes were checked against: "official sha256", "SHA256SUMS sha256", "none"


@dataclass(frozen=True)
class Limits:
    """Bounds on one file's download. `timeout` bounds each socket wait (connect, each read); `deadline` the
    whole file, every attempt included, whatever the server does (headers then a byte now and then);
    `max_bytes` its size, checked as it streams, so an endless or oversized body is cut, not stored."""

    timeout: float = 30.0
    deadline: float = 600.0
    max_bytes: int = 100_000_000


@contextlib.contextmanager
def blame_source(copy: Path, source: str, base_dir: Path) -> Iterator[None]:
    """Errors about files in `copy` (the temporary data/raw) name the same file in the source instead: the
    copy is gone by the time anyone reads the message."""
    try:
        yield
    except OracleMnistError as exc:
        origin = source if is_url(source) else str(resolve_local(source, base_dir))
        origin = origin if origin.endswith("/") else origin + "/"
        raise OracleMnistError(str(exc).replace(f"{copy}/", origin)) from None


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def resolve_local(source: str, base_dir: Path) -> Path:
    """A local data.source, relative paths taken from `base_dir` (the directory holding params.yaml)."""
    if "://" in source:
        raise OracleMnistError(
            f"data.source: unsupported URL scheme in {source!r} (use http(s) or a directory)"
        )
    path = Path(source).expanduser()
    path = path if path.is_absolute() else base_dir / path
    try:
        info = os.stat(path)
    except OSError as exc:
        raise OracleMnistError(f"data.source: {path} is not a directory ({os_problem(path, exc)})") from None
    if not stat.S_ISDIR(info.st_mode):
        raise OracleMnistError(f"data.source: {path} is not a directory ({file_kind(info.st_mode)})")
    return path


def parse_sums(text: str, where: str) -> dict[str, str]:
    """`sha256sum` output -> {relative name: hex digest}."""
    sums = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, sep, name = line.partition(" ")
        name = name.lstrip(" ").removeprefix("*")
        if (
            not sep
            or not name
            or len(digest) != 64
            or any(c not in "0123456789abcdef" for c in digest.lower())
        ):
            raise OracleMnistError(f"{where}: line {number} is not '<sha256>  <name>': {line!r}")
        sums[name] = digest.lower()
    return sums


def verify(
    path: Path, name: str, expected: Checksum | None, where: str, sha256: str | None = None
) -> FetchedFile:
    """Check `path` against `expected` (from `where`); on mismatch delete it and raise naming the file.
    `sha256`: the file's digest if already known (computed while it streamed in)."""
    size = path.stat().st_size
    digest = sha256 or sha256_file(path)
    if expected is None:
        return FetchedFile(name, digest, size, "none")
    actual = git_blob_file(path) if expected.kind == "git-blob" else digest
    if actual != expected.value:
        path.unlink()
        raise OracleMnistError(
            f"{name}: checksum mismatch, {expected.kind} is {actual} but {where} says {expected.value} "
            f"({size} bytes); the file was deleted"
        )
    return FetchedFile(name, digest, size, f"{expected.origin} {expected.kind}")


def fetch_idx(
    source: str, dest: Path, base_dir: Path, limits: Limits | None = None, retries: int = 3
) -> list[FetchedFile]:
    """The four idx files from `source` into `dest`, verified."""
    if is_url(source):
        base = source if source.endswith("/") else source + "/"
        return _download_idx(base, dest, limits or Limits(), retries)
    root = resolve_local(source, base_dir)
    tree = _LocalTree(root, base_dir)
    expected, sums_name = _local_sums(tree)
    # The same ceiling as a download of the same file: a local copy is no reason to read without end.
    max_bytes = (limits or Limits()).max_bytes
    fetched = []
    for name in IDX_NAMES:
        if not os.path.lexists(root / name):
            raise OracleMnistError(
                f"data.source: {root / name} not found (an idx source needs {list(IDX_NAMES)})"
            )
        tree.check_file(root / name)
        copy_regular(root / name, dest / name, max_bytes, f"data.max_download_bytes={max_bytes}")
        fetched.append(verify(dest / name, name, _pick(expected, name, sums_name), sums_name))
    return fetched


def _download_idx(base: str, dest: Path, limits: Limits, retries: int) -> list[FetchedFile]:
    if base == OFFICIAL_SOURCE:
        expected, sums_name = dict(OFFICIAL_CHECKSUMS), "the pinned upstream commit"
    else:
        sums_limits = dataclasses.replace(limits, max_bytes=min(limits.max_bytes, MAX_SUMS_BYTES))
        sums_text = download_text(base + SUMS_FILE, sums_limits, retries)
        expected = _as_checksums(parse_sums(sums_text, base + SUMS_FILE)) if sums_text is not None else {}
        sums_name = base + SUMS_FILE
        if sums_text is None:
            print(
                f"warning: {base} serves no {SUMS_FILE}; downloads are checked as idx only", file=sys.stderr
            )
    fetched = []
    for name in IDX_NAMES:
        # Refuse a name missing from the list before spending a download on it.
        checksum = _pick(expected, name, sums_name)
        digest = download(base + name, dest / name, limits, retries)
        fetched.append(verify(dest / name, name, checksum, sums_name, digest))
    return fetched


def fetch_scans(
    source: str, dest: Path, base_dir: Path, max_pixels: int = DataConfig.model_fields["max_pixels"].default
) -> list[FetchedFile]:
    """Copy a local scans tree's train/ and test/ into `dest`, verified against its SHA256SUMS if any. Only
    regular files within `datasets.max_scan_bytes(max_pixels)` are copied (see `_LocalTree` for symlinks)."""
    if is_url(source):
        raise OracleMnistError(
            f"data.source: {source} is a URL, but data.format 'scans' needs a local directory "
            "holding train/<label>/* and test/<label>/*"
        )
    root = resolve_local(source, base_dir)
    tree = _LocalTree(root, base_dir)
    expected, sums_name = _local_sums(tree)
    max_bytes, limit = max_scan_bytes(max_pixels), scan_bytes_limit(max_pixels)
    fetched = []
    for src in _scan_files(tree):
        name = src.relative_to(root).as_posix()
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        copy_regular(src, dest / name, max_bytes, limit)
        fetched.append(verify(dest / name, name, _pick(expected, name, sums_name), sums_name))
    return fetched


def _scan_files(tree: _LocalTree) -> Iterator[Path]:
    """The files of train/<label>/* and test/<label>/*, and loose files beside the class folders (which
    datasets.scan_items refuses, naming them). Walked to the layout's depth and no further, so no symlink
    can make the walk endless."""
    for split in ("train", "test"):
        split_dir = tree.root / split
        if not os.path.lexists(split_dir) or not tree.is_dir(split_dir):
            raise OracleMnistError(
                f"data.source: {split_dir} not found (scans need train/<label>/, test/<label>/)"
            )
        for entry in _entries(split_dir):
            if not tree.is_dir(entry):
                tree.check_file(entry)
                yield entry
                continue
            for path in _entries(entry):
                if tree.is_dir(path):
                    raise OracleMnistError(f"{path}: unexpected folder inside a class folder")
                tree.check_file(path)
                yield path


def _entries(folder: Path) -> list[Path]:
    # Desktop litter (.DS_Store, ._* resource forks, .thumbnails/) is not part of a scans tree.
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise OracleMnistError(f"{folder}: {os_problem(folder, exc)}") from None


class _LocalTree:
    """The symlink policy of a local source: a symlink, to a file or a folder, is followed only when its
    target lies inside the source itself or inside the repository (base_dir: `dvc add` with symlinked cache
    files links into .dvc/cache), and a folder symlink never to a folder that holds it (a loop). Anything
    else is refused naming the symlink, never skipped: a skipped class folder would surface later as an
    empty class."""

    def __init__(self, root: Path, base_dir: Path) -> None:
        self.root = root
        self.allowed = (root.resolve(), base_dir.resolve())

    def is_dir(self, path: Path) -> bool:
        """Whether `path` is a folder to walk (a symlink to one checked as above)."""
        info = stat_path(path)
        if not stat.S_ISDIR(info.st_mode):
            return False
        if path.is_symlink():
            target = self._target(path)
            if path.parent.resolve().is_relative_to(target):
                raise OracleMnistError(
                    f"{path}: a symlink to {target}, a folder that holds the symlink itself (a loop)"
                )
        return True

    def check_file(self, path: Path) -> None:
        """Refuse `path` unless it is a regular file (through a symlink checked as above)."""
        check_regular(path, stat_path(path))
        if path.is_symlink():
            self._target(path)

    def _target(self, link: Path) -> Path:
        target = link.resolve()
        if not any(target.is_relative_to(inside) for inside in self.allowed):
            raise OracleMnistError(
                f"{link}: a symlink to {target}, outside the source ({self.allowed[0]}) and the "
                f"repository ({self.allowed[1]}); symlinks are followed only inside them"
            )
        return target


def _local_sums(tree: _LocalTree) -> tuple[dict[str, Checksum], str]:
    sums_path = tree.root / SUMS_FILE
    if not os.path.lexists(sums_path):
        print(f"warning: {tree.root} has no {SUMS_FILE}; files are checked by content only", file=sys.stderr)
        return {}, "none"
    tree.check_file(sums_path)
    data = read_regular(sums_path, MAX_SUMS_BYTES, f"the limit of {MAX_SUMS_BYTES} bytes for a checksum list")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise OracleMnistError(f"{sums_path}: not UTF-8 text, so not a checksum list") from None
    return _as_checksums(parse_sums(text, str(sums_path))), str(sums_path)


def _as_checksums(sums: dict[str, str]) -> dict[str, Checksum]:
    return {name: Checksum("sha256", SUMS_FILE, digest) for name, digest in sums.items()}


def _pick(expected: dict[str, Checksum], name: str, sums_name: str) -> Checksum | None:
    """The checksum for `name`; once a source has a checksum list, a file missing from it is refused."""
    if name in expected:
        return expected[name]
    if expected:
        raise OracleMnistError(f"{name}: not listed in {sums_name}, so it cannot be verified")
    return None


class _Deadline:
    """Shuts down every socket of one download once `seconds` have passed: a blocked connect, header or body
    read then returns at once, whatever phase it is in."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """urllib (redirects, proxies, TLS as usual) with every connection it makes registered with `deadline`."""

    def tracked(base: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
        class Tracked(base):  # type: ignore[valid-type, misc]
            def connect(self) -> None:
                super().connect()
                deadline.track(self.sock)

        return Tracked

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(tracked(http.client.HTTPConnection), req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(tracked(http.client.HTTPSConnection), req, context=self._context)

    return urllib.request.build_opener(Http, Https)


def download(url: str, dest: Path, limits: Limits, retries: int, backoff: float = 0.5) -> str:
    """Stream `url` to `dest` with a progress bar, within `limits`; transient failures are retried with
    exponential backoff. Returns the sha256 of what was written, computed as it streamed."""
    last: Exception | None = None
    with _Deadline(limits.deadline) as deadline:
        for attempt in range(1, retries + 1):
            try:
                return _stream(url, dest, limits, deadline)
            except urllib.error.HTTPError as exc:
                dest.unlink(missing_ok=True)
                if exc.code == 404:
                    raise NotFoundError(f"{url}: HTTP 404 {exc.reason}") from None
                if exc.code < 500 and exc.code not in (408, 429):
                    raise OracleMnistError(f"{url}: HTTP {exc.code} {exc.reason}") from None
                last = exc
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                dest.unlink(missing_ok=True)
                last = exc
            except OracleMnistError:
                dest.unlink(missing_ok=True)
                raise
            if deadline.expired:
                raise OracleMnistError(
                    f"{url}: not downloaded within data.download_timeout={limits.deadline:g} s "
                    f"({attempt} attempt(s)); the partial file was deleted"
                )
            if attempt < retries:
                time.sleep(backoff * 2 ** (attempt - 1))
    reason = getattr(last, "reason", last)
    raise OracleMnistError(
        f"{url}: download failed after {retries} attempt(s) (timeout {limits.timeout:g} s each): {reason}"
    )


def download_text(url: str, limits: Limits, retries: int) -> str | None:
    """A small text file, or None when the server says it has none (404)."""
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir) / url.rsplit("/", 1)[-1]
        try:
            download(url, tmp, limits, retries)
        except NotFoundError:
            return None
        return tmp.read_text(encoding="utf-8")


def _request(url: str) -> urllib.request.Request:
    return urllib.request.Request(url, headers={"User-Agent": "oracle-mnist"})


def _too_big(url: str, size: int, limits: Limits) -> OracleMnistError:
    return OracleMnistError(
        f"{url}: {size} bytes or more, over data.max_download_bytes={limits.max_bytes}; the download was stopped"
    )


def _stream(url: str, dest: Path, limits: Limits, deadline: _Deadline) -> str:
    digest = hashlib.sha256()
    opener = _opener(deadline)
    # The connect happens before the socket can be registered: its own timeout must respect the deadline.
    with (
        opener.open(_request(url), timeout=min(limits.timeout, limits.deadline)) as resp,
        open(dest, "wb") as fh,
    ):
        total = resp.length
        if total is not None and total > limits.max_bytes:
            raise _too_big(url, total, limits)
        written = 0
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=dest.name, file=sys.stderr, leave=False
        ) as bar:
            # read1: whatever has arrived (up to 64 KiB), so a trickle still reaches the checks below.
            while chunk := resp.read1(1 << 16):
                written += len(chunk)
                if written > limits.max_bytes:
                    raise _too_big(url, written, limits)
                fh.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    if deadline.expired:  # the shut-down socket read as end of file
        raise TimeoutError(f"cut at the deadline after {written} bytes")
    if total is not None and written != total:
        raise http.client.IncompleteRead(b"", total - written)
    return digest.hexdigest()
