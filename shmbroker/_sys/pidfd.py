"""Process file descriptors: a handle on one process that PID reuse cannot fool."""

from __future__ import annotations

import os
import socket

SO_PEERPIDFD = 77  # Linux 6.5+, asm-generic/socket.h; absent from Python 3.11


def peer_pidfd(sock: socket.socket) -> int:
    """pidfd of the process that connected (not whoever owns the pid now).

    Raises OSError: ENOPROTOOPT on kernels older than 6.5, EINVAL (6.8) if
    the peer was already reaped; 6.18 instead returns a pidfd whose fdinfo
    says ``Pid: -1``, which :func:`pidfd_pid` reports.
    """
    return int(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))


def pidfd_open(pid: int) -> int:
    """Fallback for kernels without SO_PEERPIDFD; racy against reuse by design."""
    return os.pidfd_open(pid)


def pidfd_pid(pidfd: int) -> int:
    """The pid the pidfd refers to now, or -1 once that process has exited."""
    # Raw os.open/os.read: this runs twice per session, and a buffered file
    # object costs several times more than the read itself.
    fd = os.open(f"/proc/self/fdinfo/{pidfd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = os.read(fd, 4096)
    finally:
        os.close(fd)
    for line in info.splitlines():
        if line.startswith(b"Pid:"):
            return int(line.split()[1])
    # Only kernels before 5.4 lack the line; we cannot verify, so say "gone".
    return -1
