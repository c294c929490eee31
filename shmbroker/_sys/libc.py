"""The process's libc, loaded once, for calls the stdlib does not wrap."""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)


def raise_errno(what: str) -> None:
    """Raise OSError for the errno the last ctypes call left behind."""
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")
