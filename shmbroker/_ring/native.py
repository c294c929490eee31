"""The ring's C core (shmbroker/_ring_native.c) behind the reference classes.

:class:`NativeRingProducer` and :class:`NativeRingConsumer` are the
reference classes of ring.py with their hot paths (send, try_send,
send_many, take, recv, recv_into, recv_many) replaced by the core's, and
every shared word the remaining Python paths touch (rescans, PADs seen by
views, waiting flags) read with acquire loads and written with release
stores.  The core keeps the per-endpoint state (write index, limit, read
index...), so the reference code the core falls back to (waiting, errors
with their messages, rescans) reads and writes the same numbers.

The pure-Python ring stays as the reference the tests hold both to, and as
the fallback when the extension is missing, which only x86-64's memory
ordering makes sound: :func:`classes` refuses it elsewhere.
"""

from __future__ import annotations

import platform
import sys
from typing import Any

from .. import errors
from . import layout as L
from .ring import FetchCursors, FetchedCursors, RingConsumer, RingProducer, SharedWords

try:
    from .. import _ring_native
except ImportError:  # reported by classes() and `shmbroker doctor`
    _ring_native = None  # type: ignore[assignment]

# Machines whose memory ordering (TSO) the pure-Python ring relies on.
_TSO_MACHINES = ("x86_64", "AMD64")
# Tests set these to simulate another CPU or a missing extension.
_machine_override: str | None = None
_native_override: bool | None = None


def machine() -> str:
    return _machine_override or platform.machine()


def available() -> bool:
    """True when the C core is built and used."""
    if _native_override is not None:
        return _native_override and _ring_native is not None
    return _ring_native is not None


def python_fallback_is_sound() -> bool:
    # platform.machine() names the kernel's CPU: a 32-bit interpreter on an
    # x86-64 kernel passes it, yet copies a 'Q' item in two 4-byte halves.
    return machine() in _TSO_MACHINES and sys.maxsize > 2**32


def _check_layout() -> None:
    if _ring_native is None:
        return
    n = _ring_native
    expected = {
        "OFF_WRITE": L.OFF_WRITE, "OFF_PRODUCER_WAITING": L.OFF_PRODUCER_WAITING, "OFF_RESERVE": L.OFF_RESERVE,
        "OFF_SLEEPING": L.OFF_SLEEPING, "OFF_CURSOR": L.OFF_CURSOR, "RECORD_HEADER": L.RECORD_HEADER,
        "KIND_MSG": L.KIND_MSG, "KIND_PAD": L.KIND_PAD, "MAX_CONSUMERS": L.MAX_CONSUMERS,
    }
    from .._layout import REVOKED_OFFSET

    expected["OFF_REVOKED"] = REVOKED_OFFSET
    wrong = {k: (getattr(n, k), v) for k, v in expected.items() if getattr(n, k) != v}
    if wrong:  # pragma: no cover - a build of another version's source
        raise ImportError(f"shmbroker._ring_native was built for another ring layout: {wrong}; reinstall shmbroker")


_check_layout()


class _CoreField:
    """An attribute of the reference class kept in the core instead."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        return getattr(obj._core, self.name)

    def __set__(self, obj: Any, value: int) -> None:
        setattr(obj._core, self.name, value)


def _words(view: memoryview) -> SharedWords:
    assert _ring_native is not None
    return _ring_native.Words(view)


class NativeRingProducer(RingProducer):
    _w = _CoreField("w")
    _limit = _CoreField("limit")
    _reserve = _CoreField("reserve")
    _low = _CoreField("low")
    early_wrap = _CoreField("early_wrap")
    early_wrap_records = _CoreField("early_wrap_records")

    def __init__(
        self, control: memoryview, index: memoryview, payload: memoryview, header: memoryview, name: str,
        wake: Any = None, fetch_cursors: FetchCursors | None = None,
    ) -> None:
        super().__init__(control, index, payload, header, name, wake=wake, fetch_cursors=fetch_cursors)
        core = self._core
        core.wake = wake
        core.rescan = self.rescan
        core.slow_try_send = RingProducer.try_send.__get__(self)
        core.slow_try_send_many = RingProducer.try_send_many.__get__(self)
        self.try_send = core.try_send  # type: ignore[method-assign]
        self.try_send_many = core.try_send_many  # type: ignore[method-assign]
        self.after_publish = core.after_publish  # type: ignore[method-assign]

    _words = staticmethod(_words)

    def _take_cursors(self, pages: FetchedCursors) -> bool:
        taken = super()._take_cursors(pages)
        # The core rescans by itself while it has every member's page.
        for slot, held in enumerate(self._cursors):
            if held is not None:
                self._core.set_cursor(slot, held[0], held[1].view[: L.CURSOR_SIZE])
        return taken

    def _drop_cursor(self, slot: int) -> None:
        self._core.set_cursor(slot, 0, None)
        super()._drop_cursor(slot)

    def _attach_core(self) -> None:
        assert _ring_native is not None
        self._header_words = self._header[: L.CONTROL_SIZE]
        self._core: Any = _ring_native.Producer(
            self._index, self._ctrl, self._data, self._header_words, self.data_size, self.max_message
        )
        self._core.early_wrap = RingProducer.early_wrap
        self._core.early_wrap_records = RingProducer.early_wrap_records

    def release(self) -> None:
        # The core keeps the callables (a cycle the collector breaks): a
        # call in another thread may still finish with them.
        self._core.release()
        super().release()
        try:
            self._header_words.release()
        except BufferError:
            pass  # a call in another thread still copies; the core releases it after


class NativeRingConsumer(RingConsumer):
    _r = _CoreField("r")
    _wc = _CoreField("wc")

    def __init__(
        self, control: memoryview, index: memoryview, payload: memoryview, header: memoryview, name: str, slot: int,
        cursor: memoryview, wake_producer: Any = None, start: int | None = None,
    ) -> None:
        super().__init__(control, index, payload, header, name, slot, cursor, wake_producer=wake_producer, start=start)
        core = self._core
        core.wake_producer = wake_producer
        core.slow_take = RingConsumer.take.__get__(self)
        core.slow_try_recv_many = RingConsumer.try_recv_many.__get__(self)
        core.slow_has_data = RingConsumer.has_data.__get__(self)
        self.take = core.take  # type: ignore[method-assign]
        self.try_recv = core.take  # type: ignore[method-assign]
        self.try_recv_many = core.try_recv_many  # type: ignore[method-assign]
        self.has_data = core.has_data  # type: ignore[method-assign]
        self.set_sleeping = core.set_sleeping  # type: ignore[method-assign]
        self.publish_cursor = core.publish_cursor  # type: ignore[method-assign]

    _words = staticmethod(_words)

    def _attach_core(self) -> None:
        assert _ring_native is not None
        self._header_words = self._header[: L.CONTROL_SIZE]
        self._core: Any = _ring_native.Consumer(
            self._index, self._ctrl, self._data, self._header_words, self.data_size, self.max_message
        )

    def _cursor_words(self, view: memoryview) -> SharedWords:
        self._cursor_view = view
        self._core.attach_cursor(view, self.slot)
        return _words(view)

    def release(self) -> None:
        self._core.release()
        super().release()
        for view in (self._header_words, getattr(self, "_cursor_view", None)):
            if view is not None:
                try:
                    view.release()
                except BufferError:
                    pass


def classes(name: str) -> tuple[type[RingProducer], type[RingConsumer]]:
    """The ring implementation to attach with: the C core when built; the
    pure-Python reference only where it is sound (x86-64), else
    UnsupportedPlatform saying what to install."""
    if available():
        return NativeRingProducer, NativeRingConsumer
    if python_fallback_is_sound():
        return RingProducer, RingConsumer
    raise errors.UnsupportedPlatform(
        f"channel {name!r} is a ring, and rings on this CPU ({machine()}) need shmbroker's C extension "
        "shmbroker._ring_native, which is missing (the pure-Python ring is only sound on x86-64); reinstall "
        "shmbroker with pip on a machine with gcc and the Python headers (apt-get install gcc python3-dev)"
    )
