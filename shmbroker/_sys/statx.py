"""statx(2) with AT_STATX_DONT_SYNC: a file's identity without asking its file system.

The broker identifies a peer by (st_dev, st_ino) of /proc/PID/exe.  A plain
stat(2) of a file on FUSE (or NFS) may send a GETATTR to the server, and a
peer that serves its own executable from a FUSE mount can leave that request
unanswered: the stat, and the broker's event loop with it, would hang.
Following the /proc magic link does no lookup, and AT_STATX_DONT_SYNC makes
FUSE and NFS answer from the attributes they cached when the inode was
looked up (fs/fuse/dir.c fuse_update_get_attr), so this call never waits on a
peer-controlled server.  The device and inode number never need a refresh.
Python 3.11 has no os.statx, hence the thin ctypes binding.
"""

from __future__ import annotations

import ctypes
import os

from .libc import libc, raise_errno

SYS_STATX = 332  # x86-64
AT_FDCWD = -100
AT_STATX_DONT_SYNC = 0x4000
STATX_INO = 0x100
# struct statx (include/uapi/linux/stat.h) is 256 bytes; the fields used here:
# stx_mask u32 at 0, stx_ino u64 at 32, stx_dev_major/minor u32 at 136/140.
_STATX_SIZE = 256
_OFF_INO = 32
_OFF_DEV_MAJOR = 136
_OFF_DEV_MINOR = 140


def identity(path: str) -> tuple[int, int]:
    """(st_dev, st_ino) of ``path`` (symlinks followed), from cached attributes.

    st_dev is encoded like os.stat()'s, so the two compare equal."""
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if libc.syscall(SYS_STATX, AT_FDCWD, os.fsencode(path), AT_STATX_DONT_SYNC, STATX_INO, buf) != 0:
        raise_errno(f"statx {path}")
    raw = buf.raw
    if not int.from_bytes(raw[0:4], "little") & STATX_INO:
        raise OSError(0, f"statx {path}: the file system did not report an inode number")
    ino = int.from_bytes(raw[_OFF_INO : _OFF_INO + 8], "little")
    major = int.from_bytes(raw[_OFF_DEV_MAJOR : _OFF_DEV_MAJOR + 4], "little")
    minor = int.from_bytes(raw[_OFF_DEV_MINOR : _OFF_DEV_MINOR + 4], "little")
    return os.makedev(major, minor), ino
