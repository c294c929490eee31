"""Ancillary data over UNIX sockets: file descriptors (SCM_RIGHTS) and the
sender's credentials (SCM_CREDENTIALS, with SO_PASSCRED)."""

from __future__ import annotations

import array
import os
import socket
import struct

from ..limits import SCM_MAX_FD

MSG_CMSG_CLOEXEC = 0x40000000  # not exported by Python's socket module
# Sized for the kernel's maximum so a sender can never force MSG_CTRUNC on us
# by sending more fds than we expected (dbus-broker sizes it the same way).
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
_ANCBUF = socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize) + socket.CMSG_SPACE(_UCRED.size)


def pass_credentials(sock: socket.socket) -> None:
    """SO_PASSCRED: every message received on ``sock`` (and on the sockets a
    listening ``sock`` accepts) says which process sent it.  Unlike
    SO_PEERCRED, frozen at connect(), this is the sender of each write."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)


def send_with_fds(sock: socket.socket, data: bytes | memoryview, fds: list[int]) -> int:
    if not fds:
        return sock.send(data)
    return sock.sendmsg(
        [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    )


def recv_with_fds(sock: socket.socket, bufsize: int, flags: int = 0) -> tuple[bytes, list[int], int]:
    """recvmsg with MSG_CMSG_CLOEXEC; returns (data, fds, msg_flags).

    Every fd the kernel installed is returned, even from malformed control
    messages (a partial int at the end is ignored: the kernel never installs
    half an fd), so the caller can always close what it did not want.
    """
    data, fds, msg_flags, _ = recv_with_sender(sock, bufsize, flags)
    return data, fds, msg_flags


def recv_with_sender(sock: socket.socket, bufsize: int, flags: int = 0) -> tuple[bytes, list[int], int, int | None]:
    """Like :func:`recv_with_fds`, plus the pid of the process that sent the
    data (SCM_CREDENTIALS, 0 if not visible in our pid namespace), or None
    without one.  With SO_PASSCRED a stream read never joins data of two
    senders (unix(7))."""
    data, ancdata, msg_flags, _ = sock.recvmsg(bufsize, _ANCBUF, flags | MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    sender = None
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
            fds.extend(received)
        elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
            sender = _UCRED.unpack_from(payload)[0]
    return data, fds, msg_flags, sender


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
