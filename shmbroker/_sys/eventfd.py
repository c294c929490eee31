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
    """Add one to the counter; a full counter (2**64-2) already means 'wake up'."""
    try:
        os.write(fd, _ONE)
    except BlockingIOError:
        pass


def drain(fd: int) -> None:
    """Reset the counter to zero so the next poll() sleeps until a new signal."""
    try:
        os.read(fd, 8)
    except BlockingIOError:
        pass


def wait(fd: int, timeout: float | None) -> bool:
    """Sleep until the eventfd is readable or ``timeout`` seconds pass; True if readable."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return bool(poller.poll(ms))
