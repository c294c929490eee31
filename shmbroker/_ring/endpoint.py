"""Blocking and asyncio endpoints of a ring, and the Attachment methods that use them."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import Any

from .. import errors
from .._types import Role
from .._sys import eventfd
from . import layout as L
from . import native
from .ring import FetchCursors
from .waiting import CONSUMER_RECHECK_SECONDS, PRODUCER_RECHECK_SECONDS, wait, wait_async

Buffer = bytes | bytearray | memoryview


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if not timeout >= 0:  # NaN too: every comparison with it is false
        raise ValueError(f"timeout must be None or >= 0, not {timeout!r}")
    return time.monotonic() + timeout


class Sender:
    """The producer side: a RingProducer plus the eventfds to wake consumers and to sleep on."""

    def __init__(
        self, control: memoryview, index: memoryview, payload: memoryview, header: memoryview, name: str,
        producer_fd: int, consumer_fds: list[int], fetch_cursors: FetchCursors | None = None,
    ) -> None:
        self.fds = [producer_fd, *consumer_fds]
        self._fd = producer_fd
        self._consumer_fds = consumer_fds
        producer, _ = native.classes(name)
        self.ring = producer(control, index, payload, header, name, wake=self._wake, fetch_cursors=fetch_cursors)
        core = getattr(self.ring, "_core", None)
        if core is not None:
            # The core's send and send_many do the common case in C and call
            # the methods of this class for the rest (waiting, errors).
            core.set_wake_fds(consumer_fds)  # signalled from C, without a Python call
            core.slow_send = Sender.send.__get__(self)
            core.slow_send_many = self._send_many_from
            self.send = core.send  # type: ignore[method-assign]
            self.send_many = core.send_many  # type: ignore[method-assign]

    def _wake(self, slot: int) -> None:
        eventfd.signal(self._consumer_fds[slot])

    def _set_waiting(self, value: int) -> None:
        self.ring._iw[L.OFF_PRODUCER_WAITING >> 3] = value  # one aligned store (see ring.py)

    def _progress(self) -> Any:
        ring = self.ring
        limit = ring._limit
        return lambda: ring.rescan() > limit or ring.revoked()

    def _full(self, timeout: float | None) -> errors.Full:
        return errors.Full(
            f"channel {self.ring.name!r} is full: the slowest consumer has not caught up"
            + ("" if not timeout else f" within {timeout:g}s")
        )

    def send(self, data: Buffer, timeout: float | None = None) -> None:
        ring = self.ring
        if ring.try_send(data):
            return
        deadline = _deadline(timeout)
        while not ring.try_send(data):
            if deadline is not None and time.monotonic() >= deadline:
                raise self._full(timeout)
            wait(self._progress(), self._set_waiting, self._fd, deadline, PRODUCER_RECHECK_SECONDS)

    def send_many(self, items: Iterable[Buffer], timeout: float | None) -> int:
        return self._send_many_from(items if isinstance(items, list) else list(items), 0, timeout)

    def _send_many_from(self, batch: list[Buffer], done: int, timeout: float | None) -> int:
        deadline = _deadline(timeout)
        while done < len(batch):
            done += self.ring.try_send_many(batch, done)
            if done < len(batch):
                if deadline is not None and time.monotonic() >= deadline:
                    raise self._full(timeout)
                wait(self._progress(), self._set_waiting, self._fd, deadline, PRODUCER_RECHECK_SECONDS)
        return done

    @contextlib.contextmanager
    def reserve(self, n: int, timeout: float | None) -> Iterator[memoryview]:
        ring = self.ring
        deadline = _deadline(timeout)
        view = ring.try_reserve(n)
        while view is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise self._full(timeout)
            wait(self._progress(), self._set_waiting, self._fd, deadline, PRODUCER_RECHECK_SECONDS)
            view = ring.try_reserve(n)
        try:
            yield view
        finally:
            _release(view)
        # Only a clean exit gets here: an exception skips the commit, and the
        # bytes written so far stay unpublished (overwritten by the next send).
        ring.check()
        ring.commit(n)

    async def send_async(self, data: Buffer, timeout: float | None) -> None:
        ring = self.ring
        deadline = _deadline(timeout)
        while not ring.try_send(data):
            if deadline is not None and time.monotonic() >= deadline:
                raise self._full(timeout)
            await wait_async(self._progress(), self._set_waiting, self._fd, deadline, PRODUCER_RECHECK_SECONDS)

    def close(self) -> None:
        self.ring.release()


class Receiver:
    """The consumer side of one slot."""

    def __init__(
        self, control: memoryview, index: memoryview, payload: memoryview, header: memoryview, name: str, slot: int,
        cursor: memoryview, slot_fd: int, producer_fd: int, start: int | None = None,
    ) -> None:
        self.fds = [slot_fd, producer_fd]
        self._fd = slot_fd
        self._producer_fd = producer_fd
        _, consumer = native.classes(name)
        self.ring = consumer(
            control, index, payload, header, name, slot, cursor, wake_producer=self._wake_producer, start=start
        )
        core = getattr(self.ring, "_core", None)
        if core is not None:
            # As Sender: the common case in C, waiting and errors here.
            core.wake_fd = producer_fd
            core.slow_recv = Receiver.recv.__get__(self)
            core.slow_recv_into = Receiver.recv_into.__get__(self)
            core.slow_recv_many = Receiver.recv_many.__get__(self)
            self.recv = core.recv  # type: ignore[method-assign]
            self.recv_into = core.recv_into  # type: ignore[method-assign]
            self.recv_many = core.recv_many  # type: ignore[method-assign]

    def _wake_producer(self) -> None:
        eventfd.signal(self._producer_fd)

    def _empty(self, timeout: float | None) -> errors.Empty:
        return errors.Empty(f"no message on channel {self.ring.name!r} within {timeout:g}s")

    def _next(self, timeout: float | None) -> tuple[int, int]:
        ring = self.ring
        pos, n = ring.next_record()
        if pos >= 0:
            return pos, n
        deadline = _deadline(timeout)
        while True:
            if not wait(ring.has_data, ring.set_sleeping, self._fd, deadline, CONSUMER_RECHECK_SECONDS):
                raise self._empty(timeout)
            pos, n = ring.next_record()
            if pos >= 0:
                return pos, n

    def recv(self, timeout: float | None = None) -> bytes:
        data = self.ring.take()
        return self._take_after_wait(None, timeout) if data is None else data  # type: ignore[no-any-return]

    def recv_into(self, buffer: Any, timeout: float | None = None) -> int:
        n = self.ring.take(buffer)
        return self._take_after_wait(buffer, timeout) if n is None else n  # type: ignore[no-any-return]

    def _take_after_wait(self, into: Any, timeout: float | None) -> Any:
        self._next(timeout)
        out = self.ring.take(into)
        if out is None:  # _next found a record; only a revocation in between removes it
            self.ring.check()
            raise errors.SegmentError(f"channel {self.ring.name!r}: a record vanished between two reads")
        return out

    @contextlib.contextmanager
    def receive_view(self, timeout: float | None) -> Iterator[memoryview]:
        ring = self.ring
        pos, n = self._next(timeout)
        view = ring.view(pos, n)
        try:
            yield view
        finally:
            _release(view)
        # The producer cannot reuse the bytes until our cursor moves, so the
        # view was stable unless the broker revoked the channel meanwhile, or
        # another consumer forged our cursor and the producer overwrote the
        # record while the caller read it: both raise here, after the caller
        # used the view, so an error on exit means "discard what you read".
        ring.check()
        ring.check_intact()
        ring.consume(n)

    def recv_many(self, max_count: int, timeout: float | None = None) -> list[bytes]:
        # Checked here, not only in the Attachment wrapper: the attachment
        # binds this method directly as its fast path.
        if max_count < 1:
            raise ValueError("max_count must be at least 1")
        ring = self.ring
        out = ring.try_recv_many(max_count)
        while not out:
            self._next(timeout)
            out = ring.try_recv_many(max_count)
        return out

    async def recv_async(self, timeout: float | None) -> bytes:
        ring = self.ring
        deadline = _deadline(timeout)
        while True:
            data = ring.take()
            if data is not None:
                return data  # type: ignore[no-any-return]
            if not await wait_async(ring.has_data, ring.set_sleeping, self._fd, deadline, CONSUMER_RECHECK_SECONDS):
                raise self._empty(timeout)

    def close(self) -> None:
        self.ring.release()


class RingMethods:
    """The message methods of :class:`shmbroker.Attachment` (ring channels only)."""

    channel: str
    role: Role
    _ring: Sender | Receiver | None

    _FAST = ("send", "recv", "recv_into", "recv_many")

    def _bind_ring_fast_paths(self) -> None:
        """Shadow the checked methods with the endpoint's own bound methods:
        two Python calls fewer per message (about 10% at 64 bytes).  Those
        carry the same docstrings (_share_docs below), so help(att.send)
        and att.send.__doc__ still say what the method does."""
        ring = self._ring
        for name in self._FAST:
            method = getattr(ring, name, None)
            if method is not None:
                setattr(self, name, method)

    def _unbind_ring_fast_paths(self) -> None:
        for name in self._FAST:
            self.__dict__.pop(name, None)

    def _sender(self, method: str) -> Sender:
        ring = self._ring
        if isinstance(ring, Sender):
            return ring
        raise self._unsupported(method, "producer")

    def _receiver(self, method: str) -> Receiver:
        ring = self._ring
        if isinstance(ring, Receiver):
            return ring
        raise self._unsupported(method, "consumer")

    def _unsupported(self, method: str, needed: str) -> errors.ShmBrokerError:
        if getattr(self, "_link", None) is None:
            return errors.ChannelRevoked(f"{method}(): the attachment to channel {self.channel!r} is closed")
        if self._ring is None:
            return errors.UnsupportedOperation(
                f"{method}() needs a ring channel, but {self.channel!r} is a raw channel: read and write "
                "its bytes through .buf, or use a channel created with ring=True (ring = true in the config)"
            )
        verb = "send" if needed == "producer" else "receive"
        return errors.UnsupportedOperation(
            f"{method}() is for {needed}s, but this attachment to channel {self.channel!r} is a {self.role}; "
            f"attach as {needed!r} to {verb} messages"
        )

    @property
    def max_message(self) -> int | None:
        """Largest message this ring channel carries (None for raw channels)."""
        return None if self._ring is None else self._ring.ring.max_message

    def send(self, data: Buffer, timeout: float | None = None) -> None:
        """Copy ``data`` into the ring as one message; block while full.

        ``timeout=0`` never blocks.  Raises Full on timeout, MessageTooLarge,
        ChannelRevoked."""
        self._sender("send").send(data, timeout)

    def send_many(self, items: Iterable[Buffer], timeout: float | None = None) -> int:
        """Send every item in order, publishing in batches; returns the count."""
        return self._sender("send_many").send_many(items, timeout)

    def reserve(self, n: int, timeout: float | None = None) -> contextlib.AbstractContextManager[memoryview]:
        """``with att.reserve(n) as view:`` write exactly n bytes in place; published on a clean exit."""
        return self._sender("reserve").reserve(n, timeout)

    async def send_async(self, data: Buffer, timeout: float | None = None) -> None:
        """``await att.send_async(data)``: :meth:`send` without blocking the
        event loop; while the ring is full it waits on the producer's eventfd
        through ``loop.add_reader``.  Raises Full after ``timeout`` seconds."""
        await self._sender("send_async").send_async(data, timeout)

    def recv(self, timeout: float | None = None) -> bytes:
        """The next message; raises Empty after ``timeout`` seconds (None waits forever)."""
        return self._receiver("recv").recv(timeout)

    def recv_into(self, buffer: Any, timeout: float | None = None) -> int:
        """Copy the next message into ``buffer``; returns its length."""
        return self._receiver("recv_into").recv_into(buffer, timeout)

    def receive_view(self, timeout: float | None = None) -> contextlib.AbstractContextManager[memoryview]:
        """``with att.receive_view() as view:`` a zero-copy read-only view, released on exit.

        The record is checked on exit, after the block used the view: a
        SegmentError or ChannelRevoked raised there means the bytes may have
        changed while the block read them, so discard whatever it derived."""
        return self._receiver("receive_view").receive_view(timeout)

    def recv_many(self, max_count: int, timeout: float | None = None) -> list[bytes]:
        """Between 1 and ``max_count`` messages; waits (up to timeout) only for the first."""
        if max_count < 1:
            raise ValueError("max_count must be at least 1")
        return self._receiver("recv_many").recv_many(max_count, timeout)

    async def recv_async(self, timeout: float | None = None) -> bytes:
        """``await att.recv_async()``: :meth:`recv` without blocking the event
        loop; it waits on the consumer's eventfd through ``loop.add_reader``.
        Raises Empty after ``timeout`` seconds (None waits forever)."""
        return await self._receiver("recv_async").recv_async(timeout)


def _share_docs() -> None:
    """Give the endpoint methods an attachment binds as its fast paths the
    docstrings of the methods they stand in for, written once, above."""
    for endpoint in (Sender, Receiver):
        for name in RingMethods._FAST:
            fast = endpoint.__dict__.get(name)
            if fast is not None:
                fast.__doc__ = getattr(RingMethods, name).__doc__


_share_docs()


def _release(view: memoryview) -> None:
    """Release a view handed to the caller.  A slice of it the caller kept
    makes release() raise BufferError; that slice still points into the ring,
    whose bytes the producer may reuse once the cursor moves.  That is the
    caller's mistake, not a reason to fail the commit or consume."""
    try:
        view.release()
    except BufferError:
        pass
