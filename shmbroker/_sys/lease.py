"""File leases (fcntl(2) F_SETLEASE / F_GETLEASE).

A write lease is granted only while no other open file description exists on
the inode, and the kernel signals the holder (SIGIO) when anyone open()s or
truncates it.  That makes a lease both a proof of exclusivity at creation and
an intrusion alarm afterwards.  fork() and SCM_RIGHTS share the description
without an open(), so handing the fd to clients never disturbs the lease.
"""

from __future__ import annotations

import fcntl

F_SETLEASE = 1024  # linux/fcntl.h: F_LINUX_SPECIFIC_BASE + 0
F_GETLEASE = 1025  # F_LINUX_SPECIFIC_BASE + 1


def take_write_lease(fd: int) -> None:
    """Raise OSError (EAGAIN/EBUSY) if any other open exists on the inode."""
    fcntl.fcntl(fd, F_SETLEASE, fcntl.F_WRLCK)


def release_lease(fd: int) -> None:
    fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)


def holds_write_lease(fd: int) -> bool:
    """False once a break has started: F_GETLEASE then reports the downgrade target."""
    return fcntl.fcntl(fd, F_GETLEASE) == fcntl.F_WRLCK
