"""Reserving and releasing a file's pages: fallocate(2).

On tmpfs (shm_open objects) and memfds a sparse file gets its pages only
when first touched; with /dev/shm full that first touch is a SIGBUS in
whichever process made it.  ``reserve`` allocates them up front, so the
failure (ENOSPC) happens once, at creation, where it can be refused.
``punch_hole`` frees pages at once and every mapping then reads zeros;
it needs no free space, so it cannot fail where a write of zeros could.
"""

from __future__ import annotations

import ctypes

from .libc import libc, raise_errno

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_fallocate = libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int


def reserve(fd: int, offset: int, length: int) -> None:
    """Allocate the pages of [offset, offset + length) (mode 0: may extend the file)."""
    if _fallocate(fd, 0, offset, length) != 0:
        raise_errno("fallocate")


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the pages of [offset, offset + length), keeping the size; they read as zeros."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        raise_errno("fallocate(PUNCH_HOLE)")


