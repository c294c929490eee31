"""pyzmq PUSH/PULL over ipc:// (a UNIX socket underneath, plus zmq's I/O thread)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .base import Lane, Peer, Receiver, Sender


class _Push(Sender):
    def __init__(self, ctx: Any, sock: Any) -> None:
        self.ctx = ctx
        self.sock = sock

    def send(self, data: memoryview) -> None:
        # copy=True: the harness reuses its buffer for the next message, and
        # zmq would otherwise send it later from its I/O thread.
        self.sock.send(data, copy=True)

    def close(self) -> None:
        self.sock.close()  # default linger: flush what is queued
        self.ctx.term()


class _Pull(Receiver):
    def __init__(self, ctx: Any, sock: Any) -> None:
        self.ctx = ctx
        self.sock = sock

    def recv_into(self, buf: bytearray) -> int:
        return int(self.sock.recv_into(buf))

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


class _ZmqLane(Lane):
    def __init__(self, path: Path) -> None:
        self.path = path

    def open_sender(self) -> Sender:
        import zmq

        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.connect(f"ipc://{self.path}")
        return _Push(ctx, sock)

    def open_receiver(self) -> Receiver:
        import zmq

        ctx = zmq.Context()
        sock = ctx.socket(zmq.PULL)
        sock.bind(f"ipc://{self.path}")
        return _Pull(ctx, sock)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


class ZmqPeer(Peer):
    name = "zmq"
    description = "pyzmq PUSH/PULL over ipc://, send(copy=True) / recv_into"

    def __init__(self) -> None:
        self.dir = Path("/tmp")
        self.count = 0

    def available(self) -> str | None:
        if importlib.util.find_spec("zmq") is None:
            return "pyzmq is not installed (pip install 'shmbroker[bench]')"
        import zmq

        if not hasattr(zmq.Socket, "recv_into"):
            return f"pyzmq {zmq.__version__} has no Socket.recv_into (needs 26.4 or newer)"
        return None

    def start(self, ctx: Any) -> None:
        self.dir = ctx.tmpdir

    def lane(self, size: int, index: int) -> Lane:
        self.count += 1
        return _ZmqLane(self.dir / f"zmq{self.count}.sock")
