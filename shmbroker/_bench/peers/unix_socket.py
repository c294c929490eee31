"""AF_UNIX stream socket pair: what most local RPC runs over."""

from __future__ import annotations

import socket

from .base import Lane, Peer, Receiver, Sender, read_exactly

# Large buffers so a 1 MiB message is not split into dozens of wakeups;
# the kernel caps them at net.core.{w,r}mem_max anyway.
SOCKET_BUFFER = 4 << 20


class _Send(Sender):
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, data: memoryview) -> None:
        self.sock.sendall(data)


class _Recv(Receiver):
    def __init__(self, sock: socket.socket, size: int) -> None:
        self.sock = sock
        self.size = size

    def recv_into(self, buf: bytearray) -> int:
        return read_exactly(self.sock.recv_into, memoryview(buf)[: self.size])


class _SocketLane(Lane):
    def __init__(self, size: int) -> None:
        self.size = size
        self.a, self.b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (self.a, self.b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)

    def open_sender(self) -> Sender:
        self.b.close()
        return _Send(self.a)

    def open_receiver(self) -> Receiver:
        self.a.close()
        return _Recv(self.b, self.size)

    def close(self) -> None:
        self.a.close()
        self.b.close()


class UnixSocketPeer(Peer):
    name = "unix"
    description = "AF_UNIX SOCK_STREAM socketpair with 4 MiB buffers; sendall / recv_into"

    def lane(self, size: int, index: int) -> Lane:
        return _SocketLane(size)
