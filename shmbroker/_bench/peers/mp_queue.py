"""multiprocessing.Queue: pickles each message through a pipe via a feeder thread."""

from __future__ import annotations

import multiprocessing
from typing import Any

from .base import Lane, Peer, Receiver, Sender, copy_into

# Bounded like the other peers, so a fast producer blocks instead of
# buffering the whole run in its feeder thread's memory.
QUEUE_DEPTH = 64


class _Put(Sender):
    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def send(self, data: memoryview) -> None:
        self.queue.put(bytes(data))

    def close(self) -> None:
        # Wait for the feeder thread to flush, or the last messages are lost.
        self.queue.close()
        self.queue.join_thread()


class _Get(Receiver):
    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def recv_into(self, buf: bytearray) -> int:
        item = self.queue.get()
        return copy_into(buf, item)


class _QueueLane(Lane):
    def __init__(self) -> None:
        self.queue = multiprocessing.get_context("fork").Queue(QUEUE_DEPTH)

    def open_sender(self) -> Sender:
        return _Put(self.queue)

    def open_receiver(self) -> Receiver:
        return _Get(self.queue)

    def close(self) -> None:
        self.queue.close()
        self.queue.cancel_join_thread()


class MpQueuePeer(Peer):
    name = "mp-queue"
    description = f"multiprocessing.Queue({QUEUE_DEPTH}); put(bytes) / get()"

    def lane(self, size: int, index: int) -> Lane:
        return _QueueLane()
