"""multiprocessing.shared_memory + two semaphores: the classic bounded buffer.

A ring of slots in one SharedMemory block; the producer waits on "empty",
copies a message into the next slot and posts "full"; the consumer does the
mirror image and copies the message out.  Single producer, single consumer
per lane, as for every other peer.
"""

from __future__ import annotations

import multiprocessing
import struct
from multiprocessing import shared_memory
from typing import Any

from .base import Lane, Peer, Receiver, Sender, copy_into

# Eight slots: enough to keep both sides busy, the same depth as the other
# shared-memory peers get.
SLOTS = 8
_LEN = struct.Struct("=Q")


class _SlotWriter(Sender):
    def __init__(self, lane: _ShmLane) -> None:
        self.lane = lane
        self.i = 0

    def send(self, data: memoryview) -> None:
        lane = self.lane
        lane.empty.acquire()
        off = (self.i % SLOTS) * lane.stride
        self.i += 1
        n = len(data)
        _LEN.pack_into(lane.buf, off, n)
        lane.buf[off + _LEN.size : off + _LEN.size + n] = data
        lane.full.release()


class _SlotReader(Receiver):
    def __init__(self, lane: _ShmLane) -> None:
        self.lane = lane
        self.i = 0

    def recv_into(self, buf: bytearray) -> int:
        lane = self.lane
        lane.full.acquire()
        off = (self.i % SLOTS) * lane.stride
        self.i += 1
        n: int = _LEN.unpack_from(lane.buf, off)[0]
        copy_into(buf, lane.buf[off + _LEN.size : off + _LEN.size + n])
        lane.empty.release()
        return n


class _ShmLane(Lane):
    def __init__(self, size: int, name: str) -> None:
        ctx = multiprocessing.get_context("fork")
        self.stride = _LEN.size + size
        self.shm = shared_memory.SharedMemory(name=name, create=True, size=SLOTS * self.stride)
        # The workers inherit the mapping across fork(), so the name is not
        # needed past this point: unlinking now means even kill -9 of the
        # whole run leaves nothing in /dev/shm.
        self.shm.unlink()
        self.buf: Any = self.shm.buf
        self.empty = ctx.Semaphore(SLOTS)
        self.full = ctx.Semaphore(0)

    def open_sender(self) -> Sender:
        return _SlotWriter(self)

    def open_receiver(self) -> Receiver:
        return _SlotReader(self)

    def close(self) -> None:
        self.buf = None
        self.shm.close()


class SharedMemoryPeer(Peer):
    name = "shared-memory"
    description = f"multiprocessing.shared_memory ring of {SLOTS} slots, two multiprocessing.Semaphore"

    def __init__(self) -> None:
        self.tag = "shmbench"
        self.count = 0

    def start(self, ctx: Any) -> None:
        self.tag = ctx.tag

    def lane(self, size: int, index: int) -> Lane:
        self.count += 1
        return _ShmLane(size, f"{self.tag}psm{self.count}")
