"""The floor under an attach: the least an authenticated fd handoff costs
in Python on this machine, measured beside the broker in the same run.

A bare server that does only what any authenticated handoff must: accept,
read SO_PEERCRED, stat the peer's /proc/PID/exe, make a memfd of the
segment's size and send it with SCM_RIGHTS.  Its client connects, receives
the fd and maps it.  No policy, no protocol, no sandbox, no wipes: shmbroker's
attach latency over this is what its checks and bookkeeping cost
(issue 13 asks for at most 2x).
"""

from __future__ import annotations

import array
import mmap
import os
import signal
import socket
from pathlib import Path
from typing import Any

from .._sys import statx

SOL_UCRED = 12  # bytes of struct ucred


class BareServer:
    """The bare handoff server, in a forked child."""

    def __init__(self, directory: Path, size: int) -> None:
        self.path = str(directory / "bare.sock")
        self.size = size
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(self.path)
        listener.listen(16)
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child never returns
            try:
                _serve(listener, size)
            finally:
                os._exit(0)
        listener.close()

    def attach(self) -> Any:
        """What a client does: connect, receive the fd, map it (an object with .buf and .close())."""
        return _Handoff(self.path, self.size)

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)


class _Handoff:
    def __init__(self, path: str, size: int) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            _, ancdata, _, _ = sock.recvmsg(1, socket.CMSG_SPACE(4))
        fd = array.array("i", ancdata[0][2])[0]
        try:
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.buf = memoryview(self._map)

    def close(self) -> None:
        self.buf.release()
        self._map.close()


def _serve(listener: socket.socket, size: int) -> None:  # pragma: no cover - child process
    while True:
        conn, _ = listener.accept()
        with conn:
            pid = int.from_bytes(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, SOL_UCRED)[:4], "little")
            statx.identity(f"/proc/{pid}/exe")
            fd = os.memfd_create("bare-handoff", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                conn.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            finally:
                os.close(fd)
