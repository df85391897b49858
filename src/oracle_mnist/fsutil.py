"""Atomic writes, bounded reads of regular files, content hashes: no reader ever sees a half-written output,
and no input is read without a bound."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from oracle_mnist.errors import OracleMnistError, commit_guard


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    # mkstemp creates 0600; outputs get the usual permissions so other users (a container's) can read them.
    tmp.chmod(0o666 & ~_umask())
    try:
        yield tmp
        with commit_guard():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory; it replaces `path` as a whole only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        with commit_guard():
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tmp_prefix(path: Path) -> str:
    # The writer's pid in the name tells a live writer's temporary file from one a killed run left behind.
    return f".{path.name}.{os.getpid()}-"


def remove_leftovers(path: Path) -> None:
    """Delete what interrupted writes of `path` left beside it (`.<name>.<pid>-*.tmp` of dead processes,
    `.<name>.old`); a temporary file of a writer still running is kept."""
    # mkstemp's random part is [a-z0-9_]; names without a pid are from before pids were added.
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(?:(\d+)-)?[a-z0-9_]+\.tmp|old)")
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None or (match[1] is not None and _running(int(match[1]))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(
            json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n", encoding="utf-8"
        )


def os_problem(path: str | Path, exc: OSError) -> str:
    """What an OSError from stat/open of `path` means, in words (a loop and a dangling symlink named as such)."""
    if exc.errno == errno.ELOOP:
        return "a symlink loop (too many levels of symbolic links)"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return f"a dangling symlink (to {os.readlink(path)}, which does not exist)"
    if exc.errno == errno.ENOENT:
        return "no such file or directory"
    return f"cannot be read: {exc.strerror or exc}"


def stat_path(path: str | Path) -> os.stat_result:
    """`os.stat` (symlinks followed), or an OracleMnistError naming `path` and the problem."""
    try:
        return os.stat(path)
    except OSError as exc:
        raise OracleMnistError(f"{path}: {os_problem(path, exc)}") from None


def file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "a special file"


def check_regular(path: str | Path, info: os.stat_result) -> None:
    """Refuse anything but a regular file: a FIFO blocks its reader, a device (/dev/zero) never ends."""
    if stat.S_ISREG(info.st_mode):
        return
    through = f" (a symlink to {os.readlink(path)})" if os.path.islink(path) else ""
    raise OracleMnistError(f"{path}: {file_kind(info.st_mode)}{through}, not a regular file")


@contextlib.contextmanager
def open_regular(path: str | Path, max_bytes: int, limit: str) -> Iterator[BinaryIO]:
    """Open `path` for reading only if it is a regular file of at most `max_bytes` (`limit` names that
    bound in the message); the caller must still read no more than `max_bytes` + 1, as a file can grow."""
    # Checked before opening: opening a device can have effects of its own, and a FIFO waits for a writer.
    check_regular(path, stat_path(path))
    try:
        # O_NONBLOCK: a FIFO swapped in after the check must not block the open; fstat below refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise OracleMnistError(f"{path}: {os_problem(path, exc)}") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        check_regular(path, info)
        if info.st_size > max_bytes:
            raise OracleMnistError(f"{path}: {info.st_size} bytes, over {limit}; refused before reading it")
        yield fh


def _read(fh: BinaryIO, path: str | Path, size: int) -> bytes:
    try:
        return fh.read(size)
    except OSError as exc:
        raise OracleMnistError(f"{path}: {os_problem(path, exc)}") from None


def _grew(path: str | Path, limit: str) -> OracleMnistError:
    return OracleMnistError(f"{path}: grew past {limit} while it was read; refused")


def read_regular(path: str | Path, max_bytes: int, limit: str) -> bytes:
    """The content of a regular file of at most `max_bytes`, or an OracleMnistError naming `path`."""
    with open_regular(path, max_bytes, limit) as fh:
        # Sized by the file, not by the limit: read(n) allocates n bytes up front.
        data = _read(fh, path, os.fstat(fh.fileno()).st_size)
        # A file that grew since its stat is read on in blocks, to just past the limit at most.
        while len(data) <= max_bytes and (block := _read(fh, path, 1 << 20)):
            data += block
    if len(data) > max_bytes:
        raise _grew(path, limit)
    return data


def copy_regular(src: str | Path, dst: str | Path, max_bytes: int, limit: str) -> None:
    """Copy a regular file of at most `max_bytes` to `dst`; anything else is refused naming `src`, and a
    partial `dst` is deleted."""
    try:
        with open_regular(src, max_bytes, limit) as fh, open(dst, "wb") as out:
            copied = 0
            while block := _read(fh, src, 1 << 20):
                copied += len(block)
                if copied > max_bytes:
                    raise _grew(src, limit)
                out.write(block)
    except BaseException:
        Path(dst).unlink(missing_ok=True)
        raise


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def git_blob_file(path: str | Path) -> str:
    """`git_blob_id` of a file, read in blocks (the header needs only its size)."""
    digest = hashlib.sha1(b"blob " + str(os.stat(path).st_size).encode() + b"\0")
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content (`git hash-object`), used to verify against an upstream commit."""
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()
