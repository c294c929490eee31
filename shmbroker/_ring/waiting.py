"""Waiting for a ring: spin briefly, then sleep in the kernel on an eventfd.

Lost wake-ups are impossible by the classic flag-then-recheck handshake:

* a waiter stores its "sleeping" flag, fences, re-checks the ring, and only
  then sleeps in poll(2) on its eventfd;
* a waker publishes its index, fences, then loads the flags and signals the
  eventfd of every sleeper.

With both fences, at least one side sees the other's store: either the
waiter's re-check sees the new index (and does not sleep), or the waker sees
the flag (and the eventfd counter stays non-zero until the waiter reads it,
so a signal that arrives before poll() still wakes it).  The eventfd is
level-triggered, so there is no window between the re-check and poll().
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from .._sys import eventfd
from .ring import fence

try:
    from .._ring_native import sleep as _native_sleep
except ImportError:  # the pure-Python fallback (native.py)
    _native_sleep = None  # type: ignore[assignment]


def _sleep(fd: int, timeout: float | None) -> None:
    """poll(2) the eventfd, then drain it: one C call when the core is
    built (a wake-up then costs no interpreter work between the kernel's
    return and the re-check), eventfd.wait + eventfd.drain otherwise."""
    if _native_sleep is not None:
        _native_sleep(fd, timeout)
    else:
        eventfd.wait(fd, timeout)
        eventfd.drain(fd)

_yield = os.sched_yield

# Spin this long before sleeping: about what one sleep + wake-up through
# poll(2) and an eventfd costs from Python, so spinning longer cannot win
# (the same reasoning as glibc's adaptive mutexes, which spin about as long
# as a futex round trip).
SPIN_SECONDS = 50e-6
# A producer waiting for space re-checks at least this often even without a
# wake-up: every consumer holds the producer's eventfd, so a hostile one
# could read (steal) its wake-ups; this bounds the damage to a delay.
PRODUCER_RECHECK_SECONDS = 0.05
# A sleeping consumer re-checks the ring (and the revoked word) at least this
# often.  The broker never writes to an eventfd a peer holds: a peer can
# clear O_NONBLOCK on it and fill the counter, and the broker's write would
# then block the whole broker.  So a revocation, or a slot freed behind a
# producer, reaches sleepers through these re-checks instead: two wake-ups a
# second cost an idle channel nothing measurable.
CONSUMER_RECHECK_SECONDS = 0.5


def _spin(ready: Callable[[], bool], deadline: float | None) -> bool:
    """Busy-poll ``ready`` for up to SPIN_SECONDS (or until the deadline)."""
    now = time.monotonic()
    end = now + SPIN_SECONDS
    if deadline is not None and deadline < end:
        end = deadline
    while True:
        if ready():
            return True
        if time.monotonic() >= end:
            return False
        # Give the CPU away between polls: when the scheduler puts producer
        # and consumer on one CPU, a pure busy loop would burn the slice the
        # other side needs to make progress.  With a CPU each, sched_yield
        # returns at once (about 0.3 us) and the spin is as fast as before.
        _yield()


def _sleep_budget(deadline: float | None, max_sleep: float | None) -> float | None:
    """How long the next sleep may last: until the deadline, at most max_sleep; None is forever."""
    if deadline is None:
        return max_sleep
    remaining = deadline - time.monotonic()
    return remaining if max_sleep is None else min(remaining, max_sleep)


def wait(
    ready: Callable[[], bool],
    set_flag: Callable[[int], None],
    fd: int,
    deadline: float | None,
    max_sleep: float | None = None,
) -> bool:
    """Wait until ``ready()``; False once ``deadline`` (monotonic) passed.

    ``set_flag(1)`` announces that we sleep on ``fd``; the waker signals
    ``fd`` only when it sees the flag."""
    if _spin(ready, deadline):
        return True
    while True:
        set_flag(1)
        try:
            fence()
            if ready():  # the re-check: the waker may have published before it could see our flag
                return True
            timeout = _sleep_budget(deadline, max_sleep)
            if timeout is not None and timeout <= 0:
                return False
            _sleep(fd, timeout)
        finally:
            set_flag(0)
        if ready():
            return True


async def wait_async(
    ready: Callable[[], bool],
    set_flag: Callable[[int], None],
    fd: int,
    deadline: float | None,
    max_sleep: float | None = None,
) -> bool:
    """Like :func:`wait`, but yields to the event loop instead of sleeping in poll(2)."""
    loop = asyncio.get_running_loop()
    while True:
        if ready():
            return True
        set_flag(1)
        try:
            fence()
            if ready():
                return True
            timeout = _sleep_budget(deadline, max_sleep)
            if timeout is not None and timeout <= 0:
                return False
            woken: asyncio.Future[None] = loop.create_future()

            def wake() -> None:
                if not woken.done():
                    woken.set_result(None)

            loop.add_reader(fd, wake)
            try:
                await asyncio.wait_for(woken, timeout)
            except asyncio.TimeoutError:
                pass
            finally:
                loop.remove_reader(fd)
            eventfd.drain(fd)
        finally:
            set_flag(0)
