"""Process file descriptors: a handle on one process that PID reuse cannot fool."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

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
    """The pid the pidfd refers to now, or -1 once that process has exited (been reaped)."""
    pid = _info_pid(pidfd)
    if pid is not None:
        return pid
    # Kernels before 6.13: the fdinfo file.  Raw os.open/os.read, since a
    # buffered file object costs several times more than the read itself.
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


# PIDFD_GET_INFO (Linux 6.13+, linux/pidfd.h): _IOWR(PIDFS_IOCTL_MAGIC 0xFF,
# 11, struct pidfd_info).  The struct is extensible; its first version is 64
# bytes (PIDFD_INFO_SIZE_VER0) and holds everything we ask for: the request
# mask at offset 0, the cgroup id at offset 8, the pid at 16.  Later kernels take the
# smaller size and fill in what fits.
_PIDFD_INFO_SIZE_VER0 = 64
_IOC_READ_WRITE = 3
PIDFD_GET_INFO = (_IOC_READ_WRITE << 30) | (_PIDFD_INFO_SIZE_VER0 << 16) | (0xFF << 8) | 11
PIDFD_INFO_PID = 1 << 0
PIDFD_INFO_CGROUPID = 1 << 2
_INFO = struct.Struct("<QQI")  # mask, cgroupid, pid: the head of struct pidfd_info


def _get_info(pidfd: int, mask: int) -> tuple[int, int, int] | None:
    """(answered mask, cgroup id, pid) from PIDFD_GET_INFO, or None where the
    kernel has no such ioctl (before 6.13: ENOTTY or EINVAL).  Raises OSError
    ESRCH once the process has been reaped."""
    buf = bytearray(_PIDFD_INFO_SIZE_VER0)
    _INFO.pack_into(buf, 0, mask, 0, 0)
    try:
        fcntl.ioctl(pidfd, PIDFD_GET_INFO, buf, True)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL):
            return None
        raise
    answered, cgroupid, pid = _INFO.unpack_from(buf)
    return int(answered), int(cgroupid), int(pid)


def cgroup_id(pidfd: int) -> int | None:
    """The id of the cgroup v2 cgroup the pinned process is in now, from the pidfd itself.

    None where the kernel cannot say: no PIDFD_GET_INFO or no cgroup id in
    the answer (CONFIG_CGROUPS off).  Raises OSError ESRCH once the process
    has exited: a pidfd cannot lie about which process it names, so no pid
    reuse can answer for it.
    """
    info = _get_info(pidfd, PIDFD_INFO_CGROUPID)
    return info[1] if info is not None and info[0] & PIDFD_INFO_CGROUPID else None


def _info_pid(pidfd: int) -> int | None:
    """pidfd_pid through PIDFD_GET_INFO: one ioctl instead of opening, reading
    and closing the fdinfo file, on a path every attach takes.  None where the
    kernel has no such ioctl."""
    try:
        info = _get_info(pidfd, PIDFD_INFO_PID)
    except ProcessLookupError:
        return -1  # reaped: the fdinfo file says "Pid: -1" then too
    return info[2] if info is not None and info[0] & PIDFD_INFO_PID else None
