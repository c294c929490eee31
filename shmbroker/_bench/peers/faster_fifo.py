"""faster-fifo: a multiprocessing.Queue replacement on a shared circular buffer."""

from __future__ import annotations

import importlib.util
from typing import Any

from .base import Lane, Peer, Receiver, Sender, copy_into

# faster-fifo raises Full/Empty after its timeout (10 s by default); a slow
# machine must not turn into a spurious failure, the harness has its own.
BLOCK_TIMEOUT = 3600.0
# Room for eight messages, as the other bounded peers get, but at least the
# library's default of 1 MB.
DEPTH = 8


class _Put(Sender):
    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def send(self, data: memoryview) -> None:
        self.queue.put(bytes(data), timeout=BLOCK_TIMEOUT)


class _Get(Receiver):
    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def recv_into(self, buf: bytearray) -> int:
        item = self.queue.get(timeout=BLOCK_TIMEOUT)
        return copy_into(buf, item)


class _FifoLane(Lane):
    def __init__(self, size: int) -> None:
        import faster_fifo

        self.queue = faster_fifo.Queue(max_size_bytes=max(1_000_000, DEPTH * (size + 1024)))

    def open_sender(self) -> Sender:
        return _Put(self.queue)

    def open_receiver(self) -> Receiver:
        return _Get(self.queue)

    def close(self) -> None:
        self.queue.close()


class FasterFifoPeer(Peer):
    name = "faster-fifo"
    description = "faster_fifo.Queue sized for 8 messages; put(bytes) / get()"

    def available(self) -> str | None:
        if importlib.util.find_spec("faster_fifo") is None:
            return "faster-fifo is not installed (pip install 'shmbroker[bench]')"
        return None

    def lane(self, size: int, index: int) -> Lane:
        return _FifoLane(size)
