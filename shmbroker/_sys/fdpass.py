"""Sending and receiving file descriptors over UNIX sockets (SCM_RIGHTS)."""

from __future__ import annotations

import array
import os
import socket

from ..limits import SCM_MAX_FD

MSG_CMSG_CLOEXEC = 0x40000000  # not exported by Python's socket module
# Sized for the kernel's maximum so a sender can never force MSG_CTRUNC on us
# by sending more fds than we expected (dbus-broker sizes it the same way).
_ANCBUF = socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize)


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> int:
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
    data, ancdata, msg_flags, _ = sock.recvmsg(bufsize, _ANCBUF, flags | MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
            fds.extend(received)
    return data, fds, msg_flags


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
