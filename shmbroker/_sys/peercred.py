"""Credentials the kernel recorded for a UNIX socket peer at connect() time."""

from __future__ import annotations

import array
import errno
import socket
import struct

SO_PEERGROUPS = 59  # asm-generic/socket.h; not exported by Python 3.11
_UCRED = struct.Struct("3i")
# NGROUPS_MAX on Linux; the kernel answers ERANGE when the buffer is smaller.
_NGROUPS_MAX = 65536


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) from SO_PEERCRED."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return pid, uid, gid


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """Supplementary groups from SO_PEERGROUPS (frozen at connect, like SO_PEERCRED)."""
    size = 64
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size * 4)
        except OSError as exc:
            if exc.errno == errno.ERANGE and size < _NGROUPS_MAX:
                size = min(size * 16, _NGROUPS_MAX)
                continue
            raise
        groups = array.array("I")
        groups.frombytes(raw[: len(raw) - len(raw) % groups.itemsize])
        return tuple(groups)


# The kernel's answer for a label longer than this is ERANGE; SELinux
# contexts and AppArmor profile names stay far below a page (dbus-broker
# starts at 1 KiB and grows the same way).
_PEERSEC_MAX = 65536


def peer_security(sock: socket.socket) -> bytes:
    """The peer's LSM label from SO_PEERSEC, as the kernel recorded it at connect().

    Raises OSError ENOPROTOOPT when no LSM that labels sockets (SELinux,
    AppArmor, Smack) is active.  The trailing NUL some LSMs include is
    stripped.
    """
    size = 256
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERSEC, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE and size < _PEERSEC_MAX:
                size = min(size * 16, _PEERSEC_MAX)
                continue
            raise
        return raw.rstrip(b"\0")
