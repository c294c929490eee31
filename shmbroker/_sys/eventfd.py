"""eventfd(2): the kernel object ring peers sleep on and wake each other with."""

from __future__ import annotations

import os
import select

EFD_CLOEXEC = os.EFD_CLOEXEC
EFD_NONBLOCK = os.EFD_NONBLOCK
_ONE = (1).to_bytes(8, "little")


def create() -> int:
    """A new non-blocking, close-on-exec eventfd with counter 0."""
    return os.eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)


def signal(fd: int) -> None:
    """Add one to the counter, never blocking on a counter that is already full.

    The fd is shared with other peers, and any of them can clear O_NONBLOCK
    on it (the flag belongs to the shared open file description); a write to
    a full counter would then block.  A full counter already means "wake up",
    so skip the write when poll() says it would block.  A peer racing this
    check can still stall the writer: the broker therefore never signals an
    eventfd a peer holds (docs/ring.md)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not poller.poll(0):
        return
    try:
        os.write(fd, _ONE)
    except BlockingIOError:
        pass


def drain(fd: int) -> None:
    """Reset the counter to zero so the next poll() sleeps until a new signal.

    RWF_NOWAIT makes the read non-blocking whatever the shared O_NONBLOCK
    flag says, so a peer that cleared it cannot make us block here."""
    try:
        os.preadv(fd, [bytearray(8)], -1, os.RWF_NOWAIT)
    except BlockingIOError:
        pass


def wait(fd: int, timeout: float | None) -> bool:
    """Sleep until the eventfd is readable or ``timeout`` seconds pass; True if readable."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return bool(poller.poll(ms))
