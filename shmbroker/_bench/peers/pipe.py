"""os.pipe(): the kernel copies each message in and out of a pipe buffer."""

from __future__ import annotations

import fcntl
import os

from .base import Lane, Peer, Receiver, Sender, read_exactly

# Linux's default pipe is 64 KiB; 1 MiB is the unprivileged maximum
# (/proc/sys/fs/pipe-max-size), which is what a tuned application would ask for.
F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20


class _Writer(Sender):
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, data: memoryview) -> None:
        view = data
        while view:
            view = view[os.write(self.fd, view) :]


class _Reader(Receiver):
    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._file = os.fdopen(fd, "rb", buffering=0, closefd=False)

    def recv_into(self, buf: bytearray) -> int:
        return read_exactly(self._file.readinto, memoryview(buf)[: self.size])


class _PipeLane(Lane):
    def __init__(self, size: int) -> None:
        self.size = size
        self.r, self.w = os.pipe()
        try:
            fcntl.fcntl(self.w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # a lowered pipe-max-size: keep the default, still a fair pipe

    def open_sender(self) -> Sender:
        os.close(self.r)
        return _Writer(self.w)

    def open_receiver(self) -> Receiver:
        os.close(self.w)
        return _Reader(self.r, self.size)

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


class PipePeer(Peer):
    name = "pipe"
    description = "os.pipe() with a 1 MiB pipe buffer; writes and reads loop until the whole message moved"

    def lane(self, size: int, index: int) -> Lane:
        return _PipeLane(size)
