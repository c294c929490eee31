"""POSIX shared memory objects: shm_open(3) and shm_unlink(3)."""

from __future__ import annotations

import ctypes

from .libc import libc, raise_errno

_shm_open = libc.shm_open
_shm_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint]
_shm_open.restype = ctypes.c_int
_shm_unlink = libc.shm_unlink
_shm_unlink.argtypes = [ctypes.c_char_p]
_shm_unlink.restype = ctypes.c_int


def shm_open(name: str, flags: int, mode: int) -> int:
    fd: int = _shm_open(name.encode(), flags, mode)
    if fd < 0:
        raise_errno(f"shm_open({name!r})")
    return fd


def shm_unlink(name: str) -> None:
    if _shm_unlink(name.encode()) < 0:
        raise_errno(f"shm_unlink({name!r})")
