"""The ring algorithm over plain buffers: one producer, up to MAX_CONSUMERS consumers.

Nothing here blocks or makes a syscall: every operation either completes or
reports "would block" (None/False), and the waiting layer decides whether to
spin, sleep on an eventfd or await.  That keeps the algorithm testable on a
plain shared buffer (tests/test_ring_model.py) and the same for threads and asyncio.

This is the reference implementation; the C core (shmbroker/_ring_native.c,
wired in by native.py) runs the same algorithm over the same layout with
C11 atomics, and is what attachments use when it is built.

Ordering (x86-64 TSO, see docs/ring.md): a producer stores the reserve
index, writes the record, then publishes the write index with one aligned
8-byte store; a consumer loads the write index, then reads records below it,
then loads the reserve index (anything it copied is intact if the producer
had not reserved past it by a whole lap), then stores its read index.  Every
index one side reads from the other is validated before it is used, because
the other side may be buggy, hostile or dead half-way through.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from itertools import islice
from typing import Any, Protocol

from .. import errors
from .._layout import REVOKED_OFFSET
from . import layout as L

_REC_pack = L.RECORD.pack_into
_REC_unpack = L.RECORD.unpack_from
_REVOKED = REVOKED_OFFSET // 8
_KIND_MSG = L.KIND_MSG
_KIND_PAD = L.KIND_PAD
# Word indices into the pages viewed as native u64 (little-endian hosts
# only, see layout.py).  Index page:
_W_WRITE = L.OFF_WRITE // 8
_W_LOW = L.OFF_LOW // 8
_W_RESERVE = L.OFF_RESERVE // 8
_W_MEMBERS = L.OFF_MEMBERS // 8
_W_MEMBER_GEN = L.OFF_MEMBER_GEN // 8
_W_PRODUCER_WAITING = L.OFF_PRODUCER_WAITING // 8
_W_SERIAL = [L.serial_offset(k) // 8 for k in range(L.MAX_CONSUMERS)]
_W_START = [L.start_offset(k) // 8 for k in range(L.MAX_CONSUMERS)]
# Cursor page:
_W_CURSOR = L.OFF_CURSOR // 8
# Control page:
_W_SLEEPING = L.OFF_SLEEPING // 8
_OFF_SLEEPING = L.OFF_SLEEPING
# try_recv_many copies at most this many bytes per span (one L1-sized copy).
_SPAN = 32 * 1024
# take() copies messages up to this size straight into a bytearray (the
# temporary copy CPython makes then costs less than a memoryview).
_SMALL_COPY = 4096
# Indices are byte counts; 2**62 bytes is 146 years at 1 TB/s, so a larger
# value can only come from corruption.
MAX_INDEX = 2**62

# A full memory barrier for the Dekker-style "store my flag/index, then load
# theirs" handshakes: the C extension's atomic_thread_fence(seq_cst) when it
# is built (any CPU), else a lock.  x86-64 may let a load pass an earlier
# store (the store buffer); uncontended threading.Lock acquire/release runs
# lock-prefixed instructions (glibc sem_trywait/sem_post: cmpxchg, xadd),
# which are full fences on x86-64, and only there (native.py refuses the
# pure-Python ring elsewhere).
_fence_lock = threading.Lock()
_fence_acquire = _fence_lock.acquire
_fence_release = _fence_lock.release


def _lock_fence() -> None:
    _fence_acquire()
    _fence_release()


try:
    from .. import _ring_native
except ImportError:  # a zipapp (the broker never runs a ring), or no build
    _ring_native = None  # type: ignore[assignment]

fence: Callable[[], None] = _lock_fence if _ring_native is None else _ring_native.fence


class SharedWords(Protocol):
    """Shared u64 words: a 'Q' memoryview (the reference) or the C core's
    Words (acquire loads, release stores)."""

    def __getitem__(self, index: int, /) -> int: ...

    def __setitem__(self, index: int, value: int, /) -> None: ...

    def release(self) -> None: ...


class CursorPage(Protocol):
    """A consumer's cursor page as the producer holds it: mapped read-only, unmapped by close()."""

    view: memoryview

    def close(self) -> None: ...


# What a producer's fetch_cursors callback returns: (slot, attach serial,
# page) for each consumer attached when the broker answered.
FetchedCursors = list[tuple[int, int, CursorPage]]
# The callback itself: None when the broker did not answer (not asked, timed
# out, refused, gone); the callback paces its own retries of those.
FetchCursors = Callable[[], FetchedCursors | None]


@lru_cache(maxsize=256)
def _record(n: int) -> struct.Struct:
    """A whole record of an n-byte message (header, message, zero padding)
    as one struct: a batch of small messages then costs one pack_into or
    unpack_from per message instead of a header call plus a slice copy
    (measured at 64 B: 153 -> 60 ns to write, 154 -> 72 ns to read).  Only
    for small messages: pack_into zeroes the whole record before filling it."""
    return struct.Struct(f"<II{n}s{((n + 7) & ~7) - n}x")


# After a cursor fetch that brought nothing newer, rescan asks again no
# sooner than this.  The same pace as a waiting producer's own re-checks
# (waiting.PRODUCER_RECHECK_SECONDS); meanwhile the start index bounds it.
FETCH_BACKOFF_SECONDS = 0.05


class _Base:
    """``control`` is the ring's control page (writable: the sleeping flags
    live there); ``index`` its index page (static header and the
    producer's indices; read-only for consumers); ``payload`` the segment's
    payload, read-only for consumers; ``header`` the segment header with the
    revoked word."""

    def __init__(
        self, control: memoryview, index: memoryview, payload: memoryview, header: memoryview, name: str,
    ) -> None:
        self.name = name
        if len(control) < L.CONTROL_SIZE or len(index) < L.INDEX_SIZE:
            raise errors.SegmentError(f"a ring page of channel {name!r} is too small; refusing it")
        static = L.parse_static(index)
        if static is None:
            raise errors.SegmentError(f"channel {name!r} is not a message ring (bad ring header); attach it as a raw channel")
        data_size, max_message = static
        if data_size != L.data_size_for(len(payload)) or L.check_geometry(len(payload), max_message) is not None:
            raise errors.SegmentError(f"the ring header of channel {name!r} does not match its segment; refusing it")
        self.data_size = data_size
        self.max_message = max_message
        self._ctrl = control[: L.CONTROL_SIZE]
        self._index = index[: L.INDEX_SIZE]
        self._data = payload[L.DATA_OFFSET : L.DATA_OFFSET + data_size]
        self._header = header
        # Shared words are read and written as items of a 'Q' memoryview:
        # CPython copies such an item with one 8-byte memcpy, a single aligned
        # load or store.  struct.pack_into is NOT usable for publishing: it
        # memset()s the field to zero before writing it, so a concurrent
        # reader can see 0 (observed here as a write index of 0 mid-stream).
        self._cw = self._words(self._ctrl)
        self._iw = self._words(self._index)
        self._hw = self._words(header[: L.CONTROL_SIZE])
        self._attach_core()

    # Hooks for the C core (native.py): how shared words are viewed, and
    # where the core takes the buffers it needs.  The reference views words
    # as a 'Q' memoryview (see above), relying on x86-64's ordering.
    @staticmethod
    def _words(view: memoryview) -> SharedWords:
        return view.cast("Q")

    def _attach_core(self) -> None:
        pass

    def revoked(self) -> bool:
        return self._hw[_REVOKED] != 0

    def check(self) -> None:
        if self._hw[_REVOKED]:
            raise errors.ChannelRevoked(
                f"channel {self.name!r} was revoked by the broker; attach again for a fresh segment"
            )

    def corrupt(self, what: str) -> errors.SegmentError:
        self.check()  # a wipe in progress looks like corruption; report it as what it is
        return errors.SegmentError(f"the ring of channel {self.name!r} is corrupt ({what}); detach and attach again")

    def release(self) -> None:
        for view in (self._cw, self._iw, self._hw, self._ctrl, self._index, self._data):
            try:
                view.release()
            except BufferError:
                pass


class RingProducer(_Base):
    """The only writer of records and of the write index."""

    # Messages at least this large go back to the start of the data area
    # early (_wrap_early); smaller ones stay cache-resident anyway, and a PAD
    # per lap would cost them more than it saves.  An attribute so the model
    # tests can exercise the policy with small messages.
    early_wrap = 128 * 1024
    # ... and they go back once this many records are in use.  Two left the
    # producer one record ahead, so any jitter pushed it past the window and
    # through the whole area; four measured 7% faster at 1 MiB in an 8 MiB
    # ring (33.4k against 31.0k msgs/s, medians of 12 paired trials), and six
    # or eight were slower again (the footprint outgrows the caches and TLB).
    early_wrap_records = 4

    def __init__(
        self, control: memoryview, index: memoryview, payload: memoryview, header: memoryview, name: str,
        wake: Callable[[int], None] | None = None,
        fetch_cursors: FetchCursors | None = None,
    ) -> None:
        super().__init__(control, index, payload, header, name)
        self.check()
        # Each slot's cursor page as (attach serial, page, its words), once
        # fetched from the broker; see rescan.
        self._cursors: list[tuple[int, CursorPage, SharedWords] | None] = [None] * L.MAX_CONSUMERS
        self._fetch_cursors = fetch_cursors
        self._fetch_after = 0.0  # monotonic time before which rescan does not ask again (see there)
        # A previous producer may have published messages nobody consumed;
        # continue after them.  Only producers write these words, but a
        # previous one may have been buggy or died half-way: validate them.
        iw = self._iw
        w = iw[_W_WRITE]
        low = iw[_W_LOW]
        reserve = iw[_W_RESERVE]
        if w % L.ALIGN or w >= MAX_INDEX or low > w or w - low > self.data_size or low % L.ALIGN:
            raise self.corrupt(f"write index {w}, low {low}")
        if reserve < w or reserve - w > self.data_size:
            raise self.corrupt(f"reserve index {reserve} with write index {w}")
        self._w = w
        self._low = low
        self._reserve = reserve
        self._wake = wake
        self._limit = 0
        self.rescan()

    @property
    def write_index(self) -> int:
        return self._w

    def rescan(self) -> int:
        """Recompute how far we may write: the slowest live consumer plus the data size.

        Each member's position comes from the cursor page of its current
        attachment (the one whose serial the index page shows for the slot),
        which only that consumer can write; without that page yet, from the
        start index the broker gave it, which its cursor never goes below.
        A slot's page we lack is fetched from the broker once per rescan
        (rescans happen only when the cached limit is reached, never per
        send), and after a fetch that brought nothing newer not again for
        FETCH_BACKOFF_SECONDS.  Cursors are still clamped into [w - size,
        w]: a cursor ahead of us means "read everything" (it only hurts that
        consumer) and one too far behind means "full" (the documented
        slow-consumer policy: we wait for the slowest live consumer).
        """
        iw = self._iw
        w = self._w
        size = self.data_size
        floor = w - size if w > size else 0
        cursors = self._cursors
        fetched = False
        while True:
            generation = iw[_W_MEMBER_GEN]
            members = iw[_W_MEMBERS]
            low = None
            missing = False
            for slot in range(L.MAX_CONSUMERS):
                held = cursors[slot]
                if not (members >> (8 * slot)) & 0xFF:
                    continue
                if held is not None and held[0] == iw[_W_SERIAL[slot]]:
                    r = held[2][_W_CURSOR]
                else:
                    r = iw[_W_START[slot]]
                    missing = True
                r = floor if r < floor else (w if r > w else r)
                if low is None or r < low:
                    low = r
            if low is not None and low > self._low:
                self._low = low
                iw[_W_LOW] = low
            # A lone consumer may have joined at the old LOW while we read
            # the departed one's cursor, or a slot may have been freed and
            # taken again (a new serial) while we read it: re-read the
            # generation after publishing LOW (store, fence, load; the broker
            # mirrors it in RingState.attach_consumer) and start over if it
            # changed.
            fence()
            if iw[_W_MEMBER_GEN] != generation:
                continue
            if missing and not fetched and self._fetch_cursors is not None and time.monotonic() >= self._fetch_after:
                fetched = True
                pages = self._fetch_cursors()
                if pages is not None:
                    if self._take_cursors(pages):
                        continue
                    # The broker answered with nothing newer for a slot we
                    # lack (it moved on meanwhile, or its bookkeeping
                    # failed).  A producer waiting for space rescans on every
                    # spin: without this it would ask on each one.
                    self._fetch_after = time.monotonic() + FETCH_BACKOFF_SECONDS
            break
        # With consumers, the slowest one bounds us, even below LOW (a
        # newcomer that started at the LOW it read before we raised it).
        # Without: keep what was published for the first one to join, and
        # block when that fills the ring (never drop silently).
        self._limit = (low if low is not None else self._low) + size
        return self._limit

    def _take_cursors(self, pages: FetchedCursors) -> bool:
        """Keep the fetched pages that are newer than ours; True if any was.
        A slot's older page is unmapped when a new serial replaces it."""
        cursors = self._cursors
        taken = False
        for slot, serial, page in pages:
            held = cursors[slot]
            if held is not None and held[0] >= serial:
                page.close()  # the same attachment (or an older one, from a late reply)
                continue
            if held is not None:
                self._drop_cursor(slot)
            cursors[slot] = (serial, page, self._words(page.view[: L.CURSOR_SIZE]))
            taken = True
        return taken

    def _drop_cursor(self, slot: int) -> None:
        held = self._cursors[slot]
        self._cursors[slot] = None
        if held is not None:
            try:
                held[2].release()
            except BufferError:
                pass
            held[1].close()

    def _room(self, n: int) -> int:
        """Start offset in the data area for a record of ``n`` payload bytes, or -1 if full.

        Publishes a PAD record first when the record would cross the end."""
        size = self.data_size
        rec = L.RECORD_HEADER + ((n + 7) & ~7)
        w = self._w
        pos = w % size
        if pos + rec > size:
            pad = size - pos
            if w + pad > self._limit and w + pad > self.rescan():
                return -1
            self._publish_pad()
            w += pad
            pos = 0
        if w + rec > self._limit and w + rec > self.rescan():
            return -1
        return pos

    def _wrap_early(self, rec: int) -> None:
        """Go back to the start of the data area (with a PAD over the rest)
        if every consumer is past the record that sits there.

        Large records otherwise march through the whole area, so every copy
        touches memory the caches dropped long ago; returning early keeps the
        area in use a few records long while consumers keep up, and the full
        area still buffers when they fall behind (measured at 1 MiB in an 8
        MiB ring: see docs/ring.md).  Consumers see an ordinary PAD."""
        w = self._w
        pad = self.data_size - w % self.data_size
        if w + pad + rec > self._limit and w + pad + rec > self.rescan():
            return
        self._publish_pad()

    def _publish_pad(self) -> None:
        """Cover the rest of the data area with a PAD record and publish it.
        The caller checked that the space is free.  Sleepers are woken even
        for a PAD: we may now wait for them to step over it, and they would
        otherwise sleep with it unread."""
        w = self._w
        pos = w % self.data_size
        pad = self.data_size - pos
        self._reserve_to(w + pad)
        _REC_pack(self._data, pos, pad - L.RECORD_HEADER, _KIND_PAD)
        self._publish(w + pad)
        self.after_publish()

    def _reserve_to(self, end: int) -> None:
        """Announce that we may write data up to index ``end`` (exclusive),
        before writing any of it: a consumer that copied a record starting
        at r finds reserve > r + data_size if we could have overwritten it
        meanwhile (docs/ring.md, "robustness").  Never goes back."""
        if end > self._reserve:
            self._iw[_W_RESERVE] = end  # one aligned store, like the write index
            self._reserve = end

    def _publish(self, w: int) -> None:
        if w < self._w:  # consumers treat a shrinking index as corruption
            raise AssertionError(f"write index would go back from {self._w} to {w}")
        self._iw[_W_WRITE] = w  # the one store that makes records visible
        self._w = w

    def after_publish(self) -> None:
        """Wake sleeping consumers.  Fence so our index store is visible
        before we look at their flags (they store the flag, fence, re-check)."""
        fence()
        sleeping = self._cw[_W_SLEEPING]
        if sleeping and self._wake is not None:
            for slot in range(L.MAX_CONSUMERS):
                if (sleeping >> (8 * slot)) & 0xFF:
                    self._wake(slot)

    def try_send(self, data: bytes | bytearray | memoryview) -> bool:
        """Copy one message in and publish it; False if the ring is full."""
        if self._hw[_REVOKED]:
            self.check()
        n = len(data) if type(data) is bytes else memoryview(data).nbytes
        if n > self.max_message:
            raise self.too_large(n)
        size = self.data_size
        w = self._w
        pos = w % size
        end = w + L.RECORD_HEADER + ((n + 7) & ~7)
        if n >= self.early_wrap and pos >= self.early_wrap_records * (end - w):
            self._wrap_early(end - w)
            w = self._w
            pos = w % size
            end = w + L.RECORD_HEADER + ((n + 7) & ~7)
        if end > self._limit or pos + (end - w) > size:
            pos = self._room(n)
            if pos < 0:
                return False
            w = self._w
            end = w + L.RECORD_HEADER + ((n + 7) & ~7)
        iw = self._iw
        if end > self._reserve:  # _reserve_to(end), inlined: this is the hot path
            iw[_W_RESERVE] = self._reserve = end
        data_area = self._data
        _REC_pack(data_area, pos, n, _KIND_MSG)
        data_area[pos + 8 : pos + 8 + n] = data if type(data) is bytes else memoryview(data).cast("B")
        iw[_W_WRITE] = end
        self._w = end
        # after_publish(), inlined: this is the hot path.
        fence()
        if self._cw[_W_SLEEPING] and self._wake is not None:
            self.after_publish()
        return True

    def try_send_many(self, items: list[bytes | bytearray | memoryview], start: int) -> int:
        """Publish as many of items[start:] as fit, with one publish and one
        wake per span (_SPAN bytes); returns the count."""
        self.check()
        data_area = self._data
        size = self.data_size
        max_message = self.max_message
        limit = self._limit
        reserved = self._reserve
        w = self._w
        pos = w % size
        # Hand over every span's worth: with large messages the consumer
        # copies one out while we copy the next in, instead of idling until
        # the whole batch is in (measured at 1 MiB: 1.6k msgs/s with one
        # publish per batch).
        publish_at = w + _SPAN
        count = 0
        last_n = -1  # the size rec and pack were computed for
        rec = 0
        pack: Any = None
        try:
            for view in islice(items, start, None):
                if type(view) is bytes:
                    n = len(view)
                else:
                    view = memoryview(view).cast("B")
                    n = view.nbytes
                    last_n = -1  # struct's "s" takes bytes only
                if n != last_n:
                    if n > max_message:
                        raise self.too_large(n)
                    rec = 8 + ((n + 7) & ~7)
                    pack = _record(n).pack_into if n <= _SMALL_COPY and type(view) is bytes else None
                    last_n = n if pack is not None else -1
                if w + rec > limit or pos + rec > size:
                    if w != self._w:
                        self._publish(w)
                        self.after_publish()
                    pos = self._room(n)
                    w = self._w  # _room may have published a PAD: never go back before it
                    limit = self._limit
                    reserved = self._reserve
                    if pos < 0:
                        break
                if w + rec > reserved:
                    # Reserve up to the next publish at once (one store per
                    # span, not per message), never past what we may write.
                    reserved = max(w + rec, min(publish_at, limit))
                    self._reserve_to(reserved)
                if pack is not None:
                    pack(data_area, pos, n, _KIND_MSG, view)
                else:
                    _REC_pack(data_area, pos, n, _KIND_MSG)
                    data_area[pos + 8 : pos + 8 + n] = view
                pos += rec
                w += rec
                count += 1
                if w >= publish_at:
                    self._publish(w)
                    self.after_publish()
                    publish_at = w + _SPAN
        finally:
            # Every item before the one that failed (too large, not a
            # buffer, an interrupt) is delivered; nothing after it.
            if w != self._w:
                self._publish(w)
                self.after_publish()
        return count

    def try_reserve(self, n: int) -> memoryview | None:
        """A writable view of ``n`` bytes in the ring, published by :meth:`commit`; None if full."""
        self.check()
        if n > self.max_message or n < 0:
            raise self.too_large(n)
        pos = self._room(n)
        if pos < 0:
            return None
        self._reserve_to(self._w + L.RECORD_HEADER + ((n + 7) & ~7))
        return self._data[pos + 8 : pos + 8 + n]

    def commit(self, n: int) -> None:
        size = self.data_size
        w = self._w
        pos = w % size
        _REC_pack(self._data, pos, n, _KIND_MSG)
        self._publish(w + L.RECORD_HEADER + ((n + 7) & ~7))
        self.after_publish()

    def too_large(self, n: int) -> errors.MessageTooLarge:
        return errors.MessageTooLarge(
            f"message of {n} bytes exceeds channel {self.name!r}'s max_message of {self.max_message} bytes; "
            "split it, or create the channel with a larger max_message"
        )

    def release(self) -> None:
        for slot in range(L.MAX_CONSUMERS):
            self._drop_cursor(slot)
        super().release()


class RingConsumer(_Base):
    """One consumer slot: reads every record after its cursor, then advances the cursor."""

    def __init__(
        self, control: memoryview, index: memoryview, payload: memoryview, header: memoryview, name: str, slot: int,
        cursor: memoryview, wake_producer: Callable[[], None] | None = None, start: int | None = None,
    ) -> None:
        """``cursor`` is this attachment's own cursor page (writable, nobody
        else writes it); ``start`` the first read index, from the broker's
        attach reply; None reads it from the cursor page instead, where the
        broker stored the same value."""
        super().__init__(control, index, payload, header, name)
        self.check()
        if not 0 <= slot < L.MAX_CONSUMERS:
            raise errors.SegmentError(f"consumer slot {slot} of channel {name!r} is out of range")
        if len(cursor) < L.CURSOR_SIZE:
            raise errors.SegmentError(f"the cursor page of channel {name!r} is too small; refusing it")
        self.slot = slot
        self._cur = self._cursor_words(cursor[: L.CURSOR_SIZE])
        self._sleep_off = _OFF_SLEEPING + slot
        r = self._cur[_W_CURSOR] if start is None else start
        if r % L.ALIGN or r >= MAX_INDEX:
            raise self.corrupt(f"read index {r}")
        self._cur[_W_CURSOR] = r
        self._r = r
        self._wc = r  # the last write index seen; records below it are published
        self._wake_producer = wake_producer

    def _cursor_words(self, view: memoryview) -> SharedWords:
        return self._words(view)

    def _load_write(self) -> int:
        """Load and validate the producer's write index (untrusted, maybe wiped)."""
        w = self._iw[_W_WRITE]
        r = self._r
        if w < r or w % L.ALIGN:
            raise self.corrupt(f"write index {w} with read index {r}")
        if w - r > self.data_size:
            raise self.overwritten()
        self._wc = w
        return w

    def overwritten(self) -> errors.SegmentError:
        """The producer reserved (or wrote) more than a lap past our cursor:
        what we had not read is gone, and what we copied may be torn."""
        self.check()  # a wipe in progress: report it as what it is
        return errors.SegmentError(
            f"messages of channel {self.name!r} were overwritten before this consumer read them: "
            "this consumer's cursor was moved behind its back (only this process and the ring's producer "
            "hold its cursor page), or the ring is corrupt; attach again"
        )

    def check_intact(self) -> None:
        """Raise unless the record at our cursor is still the one we found:
        the producer writes index x at x % data_size, so it can only have
        touched [r, r + len) if it reserved past r + data_size."""
        if self._iw[_W_RESERVE] > self._r + self.data_size:
            raise self.overwritten()

    def next_record(self) -> tuple[int, int]:
        """(offset in the data area, length) of the next message, or (-1, 0) if none.

        Skips PAD records.  Validates every header so a corrupt or hostile
        producer yields an error, never a read outside the data area."""
        size = self.data_size
        data = self._data
        while True:
            r = self._r
            if r == self._wc and r == self._load_write():
                if self._hw[_REVOKED]:
                    self.check()
                return -1, 0
            pos = r % size
            n, kind = _REC_unpack(data, pos)
            if kind == _KIND_MSG:
                end = r + L.RECORD_HEADER + ((n + 7) & ~7)
                if n > self.max_message or pos + (end - r) > size or end > self._wc:
                    raise self.corrupt(f"record of {n} bytes at index {r}")
                return pos + L.RECORD_HEADER, n
            if kind == _KIND_PAD and n == size - pos - L.RECORD_HEADER and r + size - pos <= self._wc:
                # A PAD of a later lap sits exactly where ours did: make sure
                # this one is ours before stepping over what it covers.
                self.check_intact()
                self._r = r + size - pos
                # Publish now: the producer may be waiting for exactly this
                # step (a record that fits only after the PAD is consumed).
                self.publish_cursor()
                continue
            raise self.corrupt(f"record kind {kind} at index {r}")

    def consume(self, n: int) -> None:
        """Advance past the current record (length ``n``) and publish the cursor."""
        self._r += L.RECORD_HEADER + ((n + 7) & ~7)
        self.publish_cursor()

    def publish_cursor(self) -> None:
        self._cur[_W_CURSOR] = self._r
        # Store-then-load handshake with a producer that sleeps while full.
        fence()
        if self._iw[_W_PRODUCER_WAITING] and self._wake_producer is not None:
            self._wake_producer()

    def take(self, into: Any = None) -> Any:
        """Copy the next message out and consume it: a new bytes, or with
        ``into`` (a writable buffer) its length after copying it there.
        None when there is no message.  MessageTooLarge, with the message
        left queued, when ``into`` is too small.  One function for both so
        the per-message path is a single call with no helper calls."""
        r = self._r
        if r != self._wc:
            # Fast path (inlined next_record for an ordinary record).
            pos = r % self.data_size
            n, kind = _REC_unpack(self._data, pos)
            end = r + L.RECORD_HEADER + ((n + 7) & ~7)
            if kind != _KIND_MSG or n > self.max_message or pos + (end - r) > self.data_size or end > self._wc:
                pos, n = self.next_record()  # PADs, and errors with a clear message
                if pos < 0:
                    return None
            else:
                pos += L.RECORD_HEADER
        else:
            pos, n = self.next_record()
            if pos < 0:
                return None
        if into is None:
            out: Any = bytes(self._data[pos : pos + n])
        else:
            # Small copies straight into a bytearray; larger ones through a
            # memoryview: CPython first copies a memoryview assigned to a
            # bytearray slice into a temporary bytearray (halved 1 MiB
            # throughput).  Length checked first: a short bytearray would grow.
            target = into if type(into) is bytearray and n <= _SMALL_COPY else memoryview(into).cast("B")
            if n > len(target):
                raise self.buffer_too_small(n, len(target))
            target[:n] = self._data[pos : pos + n]
            out = n
        # Copy first, then check: a wipe sets the revoked word before it
        # zeroes anything, and the producer stores its reserve index before
        # it overwrites anything, so a copy that raced with either is never
        # returned.
        if self._hw[_REVOKED]:
            self.check()
        iw = self._iw
        r = self._r
        if iw[_W_RESERVE] > r + self.data_size:  # check_intact(), inlined: this is the hot path
            raise self.overwritten()
        self._r = r = r + L.RECORD_HEADER + ((n + 7) & ~7)
        self._cur[_W_CURSOR] = r
        fence()
        if iw[_W_PRODUCER_WAITING] and self._wake_producer is not None:
            self._wake_producer()
        return out

    def try_recv(self) -> bytes | None:
        return self.take()  # type: ignore[no-any-return]

    def buffer_too_small(self, n: int, size: int) -> errors.MessageTooLarge:
        return errors.MessageTooLarge(
            f"the next message on channel {self.name!r} has {n} bytes but the buffer holds {size}; "
            "it stays queued: pass a buffer of at least max_message bytes"
        )

    def try_recv_many(self, max_count: int) -> list[bytes]:
        """Up to max_count messages (possibly none) with one cursor store and one fence.

        Small records are copied out of shared memory as one span and sliced
        from that private copy (one copy per span instead of one per
        message); anything unusual (PAD, a record larger than the span, a
        corrupt header) takes the checked single-record path."""
        out: list[bytes] = []
        data = self._data
        size = self.data_size
        max_message = self.max_message
        append = out.append
        r = self._r
        wc = self._wc
        last_n, last_rec, unpack_last = -1, _SPAN + 1, _REC_unpack  # no guess until a record is seen
        while len(out) < max_count:
            if r == wc:
                wc = self._load_write()  # validated against our published cursor, which is <= r
                if r == wc:
                    break
            pos = r % size
            span = min(wc - r, size - pos, _SPAN)
            n, kind = _REC_unpack(data, pos)
            # A record larger than the span would be copied twice; a PAD or
            # a corrupt header not at all: both take the checked path below.
            chunk = bytes(data[pos : pos + span]) if kind == _KIND_MSG and 8 + n <= span else b""
            # Copy, then check (see take): a lap-old chunk is never parsed.
            if chunk and self._iw[_W_RESERVE] > r + size:
                raise self.overwritten()
            off = 0
            while off < len(chunk) and len(out) < max_count:
                if off + last_rec <= span:
                    # Guess the record has the previous one's size: one call
                    # reads header and message, then the header is checked.
                    n, kind, message = unpack_last(chunk, off)
                    if n == last_n and kind == _KIND_MSG:
                        append(message)
                        off += last_rec
                        continue
                n, kind = _REC_unpack(chunk, off) if span - off >= 8 else (0, 0)
                rec_end = off + 8 + ((n + 7) & ~7)
                if kind != _KIND_MSG or n > max_message or rec_end > span:
                    break
                append(chunk[off + 8 : off + 8 + n])
                if n <= _SMALL_COPY:
                    last_n, last_rec, unpack_last = n, rec_end - off, _record(n).unpack_from
                off = rec_end
            r += off
            if off == 0 and len(out) < max_count:
                self._r = r  # PADs, big records and errors: the checked path
                pos, n = self.next_record()
                r = self._r  # it may have stepped over (and published) a PAD
                if pos < 0:
                    break
                append(bytes(data[pos : pos + n]))
                self.check_intact()
                # A big record: free its space now so the producer can refill
                # it while we copy the next one.
                self._r = r = self._r + L.RECORD_HEADER + ((n + 7) & ~7)
                self.publish_cursor()
                wc = self._wc
        if self._hw[_REVOKED]:
            self.check()
        if r < self._r:  # never move the cursor back: the producer may reuse what we stepped over
            raise AssertionError(f"read index would go back from {self._r} to {r}")
        if r != self._r or out:
            self._r = r
            self.publish_cursor()
        return out

    def view(self, pos: int, n: int) -> memoryview:
        return self._data[pos : pos + n].toreadonly()

    def release(self) -> None:
        try:
            self._cur.release()
        except BufferError:
            pass
        super().release()

    def set_sleeping(self, value: int) -> None:
        self._ctrl[self._sleep_off] = value  # a single byte store: this consumer's own flag

    def has_data(self) -> bool:
        return self._r != self._wc or self._r != self._load_write() or self.revoked()
