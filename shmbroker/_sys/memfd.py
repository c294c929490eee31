"""Anonymous shared memory that can be sealed: memfd_create(2) and F_ADD_SEALS.

Seals are what makes a memfd safe to share with a peer that may be hostile:
once F_SEAL_SHRINK is set nobody, the creator included, can truncate it, so
no peer can make another one's mapping SIGBUS (wayland's wl_shm and PipeWire
rely on the same).  memfds cannot take file leases (F_SETLEASE fails), which
is the trade-off against shm_open objects.
"""

from __future__ import annotations

import fcntl
import os

MFD_CLOEXEC = os.MFD_CLOEXEC
MFD_ALLOW_SEALING = os.MFD_ALLOW_SEALING
F_ADD_SEALS = 1033  # F_LINUX_SPECIFIC_BASE + 9
F_GET_SEALS = 1034  # F_LINUX_SPECIFIC_BASE + 10
F_SEAL_SEAL = 0x0001
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004
F_SEAL_WRITE = 0x0008

# What a shared segment needs: a fixed size forever, and no way to undo that.
SIZE_SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL


def memfd_create(name: str, flags: int = MFD_CLOEXEC | MFD_ALLOW_SEALING) -> int:
    return os.memfd_create(name, flags)


def add_seals(fd: int, seals: int) -> None:
    fcntl.fcntl(fd, F_ADD_SEALS, seals)


def get_seals(fd: int) -> int:
    """The seals on ``fd``; raises OSError (EINVAL) for files that cannot be sealed."""
    return fcntl.fcntl(fd, F_GET_SEALS)


def has_size_seals(fd: int) -> bool:
    """True when nobody, the creator included, can resize ``fd`` any more."""
    try:
        return get_seals(fd) & SIZE_SEALS == SIZE_SEALS
    except OSError:  # EINVAL: not a sealable file
        return False


def is_memfd(fd: int) -> bool:
    """True for a memfd: the kernel names its inode "/memfd:NAME"."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
    except OSError:
        return False
