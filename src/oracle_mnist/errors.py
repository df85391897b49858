"""The project's one error type, and the guard that turns it into a message and exit status 1."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
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
