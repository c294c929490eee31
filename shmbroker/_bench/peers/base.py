"""What every peer provides: lanes, each one producer-to-consumer stream.

A lane is made in the harness *before* the workers fork (so inherited
objects like pipes and queues are shared), then each worker opens its own
end after the fork: that is where a peer connects, attaches or maps.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class RunContext:
    """Per-run facts a peer may need: a private directory and a unique tag."""

    tmpdir: Path
    # Prefix for names this run creates in shared namespaces (/dev/shm), so
    # the harness can remove exactly what it made and nothing of anyone else's.
    tag: str


class Sender(abc.ABC):
    @abc.abstractmethod
    def send(self, data: memoryview) -> None:
        """Deliver one message (all of ``data``); block while the peer is full."""

    def close(self) -> None:  # noqa: B027 - most ends need nothing
        pass


def copy_into(buf: bytearray, data: bytes | memoryview) -> int:
    """Copy a received message into the consumer's buffer with one memmove;
    its length.  ``buf[:n] = data`` would copy twice: CPython first turns any
    source that is not a bytearray into a temporary bytearray."""
    n = len(data)
    memoryview(buf)[:n] = data
    return n


class Receiver(abc.ABC):
    @abc.abstractmethod
    def recv_into(self, buf: bytearray) -> int:
        """Copy the next whole message into ``buf``; return its length."""

    def close(self) -> None:  # noqa: B027
        pass


class Lane(abc.ABC):
    @abc.abstractmethod
    def open_sender(self) -> Sender:
        """Called in the producer process after the fork."""

    @abc.abstractmethod
    def open_receiver(self) -> Receiver:
        """Called in the consumer process after the fork."""

    def close(self) -> None:  # noqa: B027
        """Called in the harness once both workers have exited."""


class Peer(abc.ABC):
    name: str = ""
    description: str = ""

    def available(self) -> str | None:
        """None if this peer can run here, else why not (shown as a skip note)."""
        return None

    def start(self, ctx: RunContext) -> None:  # noqa: B027
        """Once per bench run, in the harness, before any lane."""

    def stop(self) -> None:  # noqa: B027
        """Once per bench run; must be safe after a failed or partial start."""

    def helper_cpu_seconds(self) -> float | None:
        """CPU used so far by a process the peer needs besides the workers (a broker)."""
        return None

    @abc.abstractmethod
    def lane(self, size: int, index: int) -> Lane:
        """A fresh lane for messages of exactly ``size`` bytes."""


def read_exactly(readinto: Callable[[memoryview], int | None], view: memoryview) -> int:
    """Fill ``view`` from a byte stream; 0 only on EOF before the first byte."""
    got = 0
    total = len(view)
    while got < total:
        n = readinto(view[got:])
        if not n:
            if got == 0:
                return 0
            raise EOFError(f"stream ended after {got} of {total} bytes of a message")
        got += n
    return got
