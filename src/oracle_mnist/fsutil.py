"""Atomic writes and content hashes: no reader ever sees a half-written output."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from oracle_mnist.errors import commit_guard


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
