"""The project's one error type, the guard that turns it into a message and exit status 1, and the guard that
ends a DVC stage when the `dvc` process that started it dies."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import select
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class OracleMnistError(Exception):
    """Bad input or configuration. The message names the file or field and the problem."""


def exit_on_error(main: Callable[..., T]) -> Callable[..., T]:
    """For entry points: print an OracleMnistError as one line on stderr and exit 1, no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except OracleMnistError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper


class Terminated(BaseException):
    """SIGTERM, or the dvc process that started this stage is gone. A BaseException, like KeyboardInterrupt, so
    no `except Exception` in between swallows it and every context manager's cleanup runs on the way out."""


# Linux <linux/prctl.h>: ask the kernel to signal this process when its parent dies.
_PR_SET_PDEATHSIG = 1


@dataclass
class _Owner:
    """The process whose death ends the stage: dvc (or torchrun), directly our parent or the parent of the
    shell it ran us through. `pidfd` is set in the second case, where PDEATHSIG (parent only) cannot help."""

    pid: int
    is_parent: bool
    pidfd: int | None = None


_owner: _Owner | None = None


def stage_main(main: Callable[..., T]) -> Callable[..., T]:
    """For DVC stage scripts: `exit_on_error`, and the stage ends (cleaning up its temporary files) on SIGTERM
    or as soon as the process that started it dies, so an orphan never replaces outputs a later run wrote."""
    guarded = exit_on_error(main)

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            install_stage_guard()
            return guarded(*args, **kwargs)
        except Terminated as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(128 + signal.SIGTERM) from None

    return wrapper


def install_stage_guard() -> None:
    """SIGTERM -> Terminated, and SIGTERM when the owner dies. dvc runs a stage as `$SHELL -c <cmd>`: bash
    execs the lone command (dvc is our parent), dash (/bin/sh, the fallback without $SHELL) does not."""
    global _owner
    signal.signal(signal.SIGTERM, _raise_terminated)
    parent = os.getppid()
    grandparent = _shell_parent(parent) if "DVC_STAGE" in os.environ else None
    _owner = _Owner(parent, True) if grandparent is None else _Owner(grandparent, False)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if not _owner.is_parent:
            _watch(_owner)
    # The owner may have died before the kernel was asked to tell us: then no signal will ever come.
    check_owner()


def check_owner() -> None:
    """Raise Terminated if this stage's owner has died (a no-op outside a stage). Called just before an
    output is replaced, so a stage whose dvc is gone never writes, even if the signal is still on its way."""
    if _owner is None:
        return
    if _owner.is_parent:
        alive = os.getppid() == _owner.pid
    elif _owner.pidfd is not None:
        alive = not select.select([_owner.pidfd], [], [], 0)[0]
    else:
        alive = True
    # pid 1 adopts orphans: an owner of 1 means the real one died before we looked.
    if not alive or _owner.pid == 1:
        raise Terminated(
            f"the process that started this stage (pid {_owner.pid}) is gone; no outputs written"
        )


def _shell_parent(pid: int) -> int | None:
    """The parent of `pid` if `pid` is a `<shell> -c <command>` wrapper, else None."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    if b"-c" not in argv[1:] or not Path(os.fsdecode(argv[0])).name.endswith("sh"):
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _watch(owner: _Owner) -> None:
    """A thread that sends us SIGTERM when `owner` exits (a pidfd turns readable then)."""
    try:
        owner.pidfd = os.pidfd_open(owner.pid)
    except ProcessLookupError:
        owner.pid = 1
        return
    fd = owner.pidfd

    def wait() -> None:
        select.select([fd], [], [])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="stage-owner-watch", daemon=True).start()


@contextlib.contextmanager
def commit_guard() -> Iterator[None]:
    """Around the renames that put outputs in place: refused once the stage's owner is gone, and SIGTERM held
    off until they are done (a directory swapped half-way is worse than either state). A signal mask cannot do
    this: the kernel hands the signal to any thread that does not block it, and Python runs the handler in the
    main thread all the same."""
    global _held
    check_owner()
    _held += 1
    try:
        yield
    finally:
        _held -= 1
    if not _held and _pending is not None:
        raise Terminated(f"stopped by {_pending}")


_held = 0
_pending: str | None = None


def _raise_terminated(signum: int, frame: object) -> None:
    global _pending
    name = signal.Signals(signum).name
    if _held:
        _pending = name
        return
    raise Terminated(f"stopped by {name}; no outputs written")
