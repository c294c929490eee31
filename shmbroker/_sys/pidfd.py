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
    with open(f"/proc/self/fdinfo/{pidfd}", "rb") as fdinfo:
        for line in fdinfo:
            if line.startswith(b"Pid:"):
                return int(line.split()[1])
    # Only kernels before 5.4 lack the line; we cannot verify, so say "gone".
    return -1
