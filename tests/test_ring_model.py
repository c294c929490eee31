"""The ring algorithm without a broker: hypothesis drives one producer and a
changing set of consumers over a real shared memory object (memfd), using the
broker's own slot bookkeeping (pread/pwrite on the fd) for joins and leaves,
and the broker's own cursor pages (mapped here, in-process, as the producer
would map the ones it fetched)."""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from shmbroker import errors
from shmbroker._layout import HEADER_SIZE, REVOKED
from shmbroker._ring import layout as L
from shmbroker._ring.broker import RingState
from shmbroker._ring import native
from shmbroker._ring.ring import RingConsumer, RingProducer

SEQ = struct.Struct("<Q")


class Impl:
    """The ring implementation under test: the C core or the pure-Python
    reference, over the same shared layout (the ``impl`` fixture)."""

    producer: type[RingProducer] = RingProducer
    consumer: type[RingConsumer] = RingConsumer


IMPLS: dict[str, tuple[type[RingProducer], type[RingConsumer]]] = {
    "native": (native.NativeRingProducer, native.NativeRingConsumer),
    "python": (RingProducer, RingConsumer),
}


@pytest.fixture(params=sorted(IMPLS))
def impl(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "native":
        assert native.available(), "shmbroker._ring_native is not built; `make test` builds it"
    Impl.producer, Impl.consumer = IMPLS[request.param]
    try:
        yield str(request.param)
    finally:
        Impl.producer, Impl.consumer = RingProducer, RingConsumer


# Every test here runs against both implementations.
pytestmark = pytest.mark.usefixtures("impl")


def message(seq: int, size: int) -> bytes:
    body = SEQ.pack(seq) + bytes([seq % 251]) * max(0, size - 8)
    return body[:size] if size >= 8 else SEQ.pack(seq)


class Segment:
    """A header page plus payload in a memfd, and the broker's own control
    and index memfds, all mapped shared, as the broker lays them out:
    ``index`` read-write for the producer, ``index_ro`` (from the broker's
    O_RDONLY fd) read-only for consumers."""

    def __init__(self, payload_size: int, max_message: int) -> None:
        self.fd = os.memfd_create("ring-model", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, HEADER_SIZE + payload_size)
        self.map = mmap.mmap(self.fd, HEADER_SIZE + payload_size)
        self.view = memoryview(self.map)
        self.header = self.view[:HEADER_SIZE]
        self.payload = self.view[HEADER_SIZE:]
        self.state = RingState(payload_size, max_message)
        self.control_map = mmap.mmap(self.state.fd, L.CONTROL_SIZE)
        self.control = memoryview(self.control_map)
        self.index_map = mmap.mmap(self.state.index_fd, L.INDEX_SIZE)
        self.index = memoryview(self.index_map)
        self.index_ro_map = mmap.mmap(self.state.index_ro_fd, L.INDEX_SIZE, prot=mmap.PROT_READ)
        self.index_ro = memoryview(self.index_ro_map)

    def close(self) -> None:
        self.state.close()
        for view in (self.header, self.payload, self.view, self.control, self.index, self.index_ro):
            view.release()
        for mapping in (self.map, self.control_map, self.index_map, self.index_ro_map):
            try:
                mapping.close()
            except BufferError:
                # A view is still referenced (e.g. by a frame of a traceback
                # pytest.raises keeps); it is unmapped when collected.
                pass
        os.close(self.fd)


class Page:
    """A cursor page mapped from the broker's fd (mmap keeps its own dup), as a producer or a consumer holds it."""

    def __init__(self, fd: int, *, writable: bool) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.map = mmap.mmap(fd, L.CURSOR_SIZE, prot=prot)
        self.view = memoryview(self.map)
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.view.release()
        try:
            self.map.close()
        except BufferError:
            pass  # a cast of it is still referenced; unmapped when collected

    def write(self, value: int) -> None:
        """What a process holding this page (writable) can do to the cursor in it."""
        L.U64.pack_into(self.map, L.OFF_CURSOR, value)

    def read(self) -> int:
        return int(L.U64.unpack_from(self.map, L.OFF_CURSOR)[0])


def attach(seg: Segment, who: object) -> tuple[int, Page]:
    """The broker's attach of a consumer: its slot and its own cursor page."""
    slot, _, _ = seg.state.attach_consumer(who, "model")
    return slot, Page(seg.state.cursor_fds[slot], writable=True)


def fetcher(seg: Segment, opened: list[Page] | None = None) -> object:
    """A producer's fetch_cursors that answers like the broker's cursor_pages, in-process."""

    def fetch() -> list[tuple[int, int, Page]]:
        pages = []
        for slot, fd in enumerate(seg.state.cursor_fds):
            if fd >= 0:
                pages.append((slot, seg.state.serials[slot], Page(fd, writable=False)))
        if opened is not None:
            opened.extend(page for _, _, page in pages)
        return pages

    return fetch


def producer_of(seg: Segment, **kw: object) -> RingProducer:
    return Impl.producer(seg.control, seg.index, seg.payload, seg.header, "model", fetch_cursors=fetcher(seg), **kw)  # type: ignore[arg-type]


class Member:
    def __init__(self, seg: Segment, alone: bool) -> None:
        self.slot, self.cursor = attach(seg, self)
        # The start index as the attach reply carries it (the client's path).
        self.ring = Impl.consumer(
            seg.control, seg.index_ro, seg.payload, seg.header, "model", self.slot, self.cursor.view,
            start=seg.state.starts[self.slot],
        )
        # Joining live readers starts at the newest message; joining an
        # unread ring starts at the oldest retained one, which we learn on
        # the first receive.
        self.expected: int | None = None if alone else -1


class RingModel(RuleBasedStateMachine):
    @initialize(
        data_pages=st.integers(1, 2),
        max_message=st.integers(8, 3000),
        # The early-wrap policy normally starts at 128 KiB; lowered here so
        # the model's small messages take that path too.
        early_wrap=st.sampled_from([RingProducer.early_wrap, 8, 500]),
    )
    def setup(self, data_pages: int, max_message: int, early_wrap: int) -> None:
        payload = L.DATA_OFFSET + data_pages * 4096
        max_message = min(max_message, L.data_size_for(payload) - L.RECORD_HEADER)
        self.seg = Segment(payload, max_message)
        self.max_message = max_message
        self.early_wrap = early_wrap
        # Whether the producer's requests for cursor pages get an answer (a
        # broker that is slow or gone: it bounds itself by start indices).
        self.fetching = True
        self._fetch = fetcher(self.seg)
        # Cursor pages of consumers that left and kept their mapping.
        self.departed: list[Page] = []
        self.producer = self._new_producer()
        self.sent = 0  # next sequence number
        self.members: list[Member] = []
        self.wraps = 0

    def teardown(self) -> None:
        if hasattr(self, "seg"):
            for member in self.members:
                member.ring.release()
                member.cursor.close()
            for page in self.departed:
                page.close()
            self.producer.release()
            self.seg.close()

    def _caught_up(self) -> bool:
        return all(m.ring._r == self.producer.write_index for m in self.members)

    @rule(size=st.integers(8, 3000))
    def send(self, size: int) -> None:
        size = min(size, self.max_message)
        was_empty = self._caught_up() and self.members
        before = self.producer.write_index
        ok = self.producer.try_send(message(self.sent, size))
        if was_empty and not ok and self.fetching:
            # Only possible when the record needs the start of the area and
            # a PAD was published first: once every consumer stepped over it
            # (a receive that finds nothing else), the send must succeed.
            assert self.producer.write_index % self.producer.data_size == 0
            for m in self.members:
                assert m.ring.try_recv() is None
            ok = self.producer.try_send(message(self.sent, size))
            assert ok, "a send to a ring every consumer has drained must succeed"
        if ok:
            if before // self.producer.data_size != (self.producer.write_index - 1) // self.producer.data_size:
                self.wraps += 1
            for m in self.members:
                if m.expected == -1:
                    m.expected = self.sent
            self.sent += 1

    @rule(count=st.integers(1, 20), sizes=st.lists(st.integers(8, 600), min_size=1, max_size=20))
    def send_many(self, count: int, sizes: list[int]) -> None:
        items = [message(self.sent + i, min(s, self.max_message)) for i, s in enumerate(sizes[:count])]
        done = self.producer.try_send_many(items, 0)
        assert 0 <= done <= len(items)
        if done:
            for m in self.members:
                if m.expected == -1:
                    m.expected = self.sent
        self.sent += done

    @rule(size=st.integers(8, 3000), commit=st.booleans())
    def reserve(self, size: int, commit: bool) -> None:
        size = min(size, self.max_message)
        view = self.producer.try_reserve(size)
        if view is None:
            return
        view[:] = message(self.sent, size)
        view.release()
        if not commit:
            return  # aborted: never published, overwritten by the next write
        self.producer.commit(size)
        for m in self.members:
            if m.expected == -1:
                m.expected = self.sent
        self.sent += 1

    @rule(size=st.integers(1, 10))
    def too_large(self, size: int) -> None:
        with pytest.raises(errors.MessageTooLarge, match="max_message"):
            self.producer.try_send(bytes(self.max_message + size))

    @precondition(lambda self: len(self.members) < L.MAX_CONSUMERS)
    @rule()
    def join(self) -> None:
        self.members.append(Member(self.seg, alone=not self.members))

    @precondition(lambda self: self.members)
    @rule(index=st.integers(0, L.MAX_CONSUMERS - 1))
    def leave(self, index: int) -> None:
        member = self.members.pop(index % len(self.members))
        self.seg.state.detach(member)
        member.ring.release()
        self.departed.append(member.cursor)  # it keeps its mapping of the page (munmap is voluntary)

    @precondition(lambda self: self.departed)
    @rule(index=st.integers(0, 100), ahead=st.integers(0, 2**20))
    def departed_moves_its_old_cursor(self, index: int, ahead: int) -> None:
        """An earlier occupant of a slot writes its old page far forward: the
        producer must trust only the page of the slot's current attachment."""
        self.departed[index % len(self.departed)].write(self.producer.write_index + 8 * ahead)

    @rule()
    def toggle_fetching(self) -> None:
        self.fetching = not self.fetching

    @precondition(lambda self: self.members)
    @rule(index=st.integers(0, L.MAX_CONSUMERS - 1), batch=st.integers(1, 30))
    def receive(self, index: int, batch: int) -> None:
        member = self.members[index % len(self.members)]
        for _ in range(batch):
            got = member.ring.try_recv()
            if got is None:
                assert member.expected in (None, -1, self.sent), "a consumer missed messages"
                if member.expected is not None:
                    member.expected = -1
                return
            self._received(member, got)

    def _received(self, member: Member, msg: bytes) -> None:
        """The next message a member got: in order, exactly once, byte-exact."""
        seq = SEQ.unpack_from(msg)[0]
        if member.expected is None:
            assert seq < self.sent
        else:
            assert seq == member.expected, f"expected message {member.expected}, got {seq}"
        assert msg == message(seq, len(msg)), "message bytes differ from what was sent"
        member.expected = seq + 1

    @precondition(lambda self: self.members)
    @rule(index=st.integers(0, L.MAX_CONSUMERS - 1), batch=st.integers(1, 30))
    def receive_many(self, index: int, batch: int) -> None:
        member = self.members[index % len(self.members)]
        got = member.ring.try_recv_many(batch)
        assert len(got) <= batch
        for msg in got:
            self._received(member, msg)
        if len(got) < batch:
            assert member.expected in (None, -1, self.sent), "a batch stopped early with messages left"
            if member.expected is not None:
                member.expected = -1

    @rule()
    def restart_producer(self) -> None:
        # A new producer (after kill -9 of the old one) continues after every
        # message already published.
        w = self.producer.write_index
        self.producer.release()
        self.producer = self._new_producer()
        assert self.producer.write_index == w

    def _new_producer(self) -> RingProducer:
        producer = Impl.producer(
            self.seg.control, self.seg.index, self.seg.payload, self.seg.header, "model",
            fetch_cursors=lambda: self._fetch() if self.fetching else None,  # type: ignore[operator]
        )
        producer.early_wrap = self.early_wrap
        return producer

    @invariant()
    def indices_consistent(self) -> None:
        if not hasattr(self, "seg"):
            return
        w = self.producer.write_index
        reserve = L.U64.unpack_from(self.seg.index_ro, L.OFF_RESERVE)[0]
        assert reserve == self.producer._reserve and w <= reserve
        for m in self.members:
            assert w - self.producer.data_size <= m.ring._r <= w
            # No false alarm: an honest producer never reserves more than a
            # lap past any live consumer.
            assert reserve <= m.ring._r + self.producer.data_size
            # Nor may it plan to: its cached bound never passes a live
            # consumer's real cursor, whatever departed consumers wrote.
            assert self.producer._limit <= m.ring._r + self.producer.data_size


def test_ring_model() -> None:
    run_state_machine_as_test(
        RingModel,
        settings=settings(
            max_examples=150, stateful_step_count=100, deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )


def test_revoked_segment_raises_on_next_operation() -> None:
    seg = Segment(L.DATA_OFFSET + 4096, 100)
    try:
        member = Member(seg, alone=True)
        producer = producer_of(seg)
        producer.try_send(b"x")
        REVOKED.pack_into(seg.header, 32, 1)
        with pytest.raises(errors.ChannelRevoked):
            producer.try_send(b"y")
        with pytest.raises(errors.ChannelRevoked):
            member.ring.try_recv()
        member.ring.release()
        producer.release()
    finally:
        seg.close()


@pytest.mark.parametrize("keeps_up", [True, False])
def test_large_messages_return_to_the_start_while_consumers_keep_up(keeps_up: bool) -> None:
    """The early-wrap policy: with every consumer caught up, the large record
    after ``early_wrap_records`` of them goes back to offset 0 behind a PAD instead of further into the
    area; a consumer that lags keeps the ordinary placement.  Either way it
    receives every message intact."""
    seg = Segment(L.DATA_OFFSET + 8192, 1000)
    try:
        member = Member(seg, alone=True)
        producer = producer_of(seg)
        producer.early_wrap = 1000
        rec = L.RECORD_HEADER + 1000
        sent, got = [], []
        records = producer.early_wrap_records
        for i in range(records + 1):
            sent.append(message(i, 1000))
            assert producer.try_send(sent[-1])
            if keeps_up:
                got.append(member.ring.try_recv())
        offset = (producer.write_index - rec) % producer.data_size
        assert offset == (0 if keeps_up else records * rec)
        got.extend(iter(member.ring.try_recv, None))
        assert got == sent
        member.ring.release()
        producer.release()
    finally:
        seg.close()


def test_a_newcomer_starts_where_the_broker_said_whatever_its_cursor_page_says() -> None:
    """The newcomer takes its start from the attach reply and writes it
    back to its cursor page, so a start forged there (its page is its own
    since ring layout 4, but the reply is what it trusts) neither replays
    older messages nor lands it mid-record."""
    seg = Segment(L.DATA_OFFSET + 8192, 1000)
    try:
        old = Member(seg, alone=True)
        producer = producer_of(seg)
        for i in range(3):
            assert producer.try_send(message(i, 100))
        slot, page = attach(seg, "newcomer")
        start = seg.state.starts[slot]
        assert start == producer.write_index == page.read()  # live readers: it starts at the newest
        page.write(0)  # the forgery: "start at the oldest"
        newcomer = Impl.consumer(seg.control, seg.index_ro, seg.payload, seg.header, "model", slot, page.view, start=start)
        assert page.read() == start
        assert newcomer.try_recv() is None, "the newcomer replayed messages sent before it joined"
        assert producer.try_send(message(3, 100))
        assert newcomer.try_recv() == message(3, 100)
        for r in (newcomer, old.ring, producer):
            r.release()
    finally:
        seg.close()


def test_untrusted_indices_never_read_out_of_bounds() -> None:
    """Garbage cursors and write indices give a clear error or a clamp, never an out-of-range access."""
    seg = Segment(L.DATA_OFFSET + 8192, 1000)
    try:
        member = Member(seg, alone=True)
        producer = producer_of(seg)
        assert producer.try_send(b"a" * 100)
        # A hostile consumer claims to be far behind: the producer clamps it
        # to "full" and refuses instead of overwriting or crashing.
        member.cursor.write(2**63)
        producer.rescan()
        assert producer._limit <= producer.write_index + producer.data_size
        # A corrupt write index (a buggy producer: consumers cannot write
        # it) is refused by the consumer with a clear error.
        L.U64.pack_into(seg.index, L.OFF_WRITE, 2**40 + 8)
        with pytest.raises(errors.SegmentError, match="corrupt"):
            member.ring.try_recv()
        # A corrupt record header (length past the data area) likewise.
        L.U64.pack_into(seg.index, L.OFF_WRITE, producer.write_index)
        struct.pack_into("<II", seg.payload, L.DATA_OFFSET, 2**31 - 1, L.KIND_MSG)
        member.cursor.write(0)
        fresh = Impl.consumer(seg.control, seg.index_ro, seg.payload, seg.header, "model", member.slot, member.cursor.view)
        with pytest.raises(errors.SegmentError, match="corrupt"):
            fresh.try_recv()
        struct.pack_into("<II", seg.payload, L.DATA_OFFSET, 5, 77)
        with pytest.raises(errors.SegmentError, match="kind 77"):
            fresh.try_recv()
        for r in (fresh, member.ring, producer):
            r.release()
    finally:
        seg.close()


def test_batched_receive_keeps_a_cursor_that_stepped_over_a_pad() -> None:
    """A batch that ends on a PAD must leave (and publish) the cursor after
    it: the producer may already reuse those bytes."""
    seg = Segment(L.DATA_OFFSET + 4096, 1000)
    try:
        fast, slow = Member(seg, alone=True), Member(seg, alone=False)
        producer = producer_of(seg)
        for i in range(4):
            assert producer.try_send(message(i, 1000))
        assert len(fast.ring.try_recv_many(10)) == 4
        # The next record needs a PAD first, and does not fit after it
        # while the slow consumer holds the start of the area.
        assert not producer.try_send(message(4, 1000))
        assert producer.write_index == 4096
        assert fast.ring.try_recv_many(10) == []
        assert fast.ring._r == 4096
        assert fast.cursor.read() == 4096
        for m in (fast, slow):
            m.ring.release()
        producer.release()
    finally:
        seg.close()


@contextlib.contextmanager
def _victim_and_hostile(payload: int, max_message: int) -> Iterator[tuple[Segment, Member, Member, RingProducer]]:
    """A ring with two consumers, a victim (joined first) and a hostile one, and its producer."""
    seg = Segment(payload, max_message)
    try:
        victim, hostile = Member(seg, alone=True), Member(seg, alone=False)
        producer = producer_of(seg)
        yield seg, victim, hostile, producer
        for r in (victim.ring, hostile.ring, producer):
            r.release()
    finally:
        seg.close()


def _attack(victim: Member, hostile: Member, producer: RingProducer, size: int, count: int) -> list[bytes]:
    """Two consumers; the victim reads the first of two published messages
    (so it caches a write index and reads the next record without reloading
    it); then the victim's cursor is moved to the write index before each
    of ``count`` sends, so the producer laps the victim.

    Since ring layout 4 no other consumer can do this (each attachment's
    cursor page is its own: test_an_earlier_occupant_of_the_slot_cannot_move_the_new_consumers_cursor,
    tests/test_ring_hostile.py); only a process holding the victim's page,
    i.e. the victim itself through a bug, which the model plays by writing
    the page directly.  The reserve-index check these tests exercise is the
    defence in depth behind the pages."""
    sent = [message(i, size) for i in range(count)]
    assert producer.try_send(sent[0]) and producer.try_send(sent[1])
    assert victim.ring.try_recv_many(1) == sent[:1]
    assert hostile.ring.try_recv_many(2) == sent[:2]
    for msg in sent[2:]:
        victim.cursor.write(producer.write_index)
        assert producer.try_send(msg), "the forged cursor should have let the producer lap the victim"
        assert hostile.ring.try_recv() == msg
    return sent


@pytest.mark.parametrize("receive", ["take", "try_recv_many"])
@pytest.mark.parametrize("size", [100, 40_000], ids=["span", "big-record"])
def test_a_victim_whose_cursor_was_moved_gets_an_error_never_a_stale_message(receive: str, size: int) -> None:
    """The producer writes index x at x % data_size, so after a lap the
    victim's next record holds a message of a later lap, well-formed and
    plausible.  The reserve index tells the victim, after its copy, that the
    record was overwritten: SegmentError, never the later lap's message.
    Both try_recv_many paths: spans of small records, and a record larger
    than a span."""
    with _victim_and_hostile(L.DATA_OFFSET + (4 if size == 100 else 32) * 4096, size) as (seg, victim, hostile, producer):
        lap = L.data_size_for(len(seg.payload)) // (L.RECORD_HEADER + size)
        sent = _attack(victim, hostile, producer, size, 2 * lap + 3)
        got = [sent[0]]
        with pytest.raises(errors.SegmentError, match="overwritten before this consumer read them"):
            while True:
                batch = [victim.ring.take()] if receive == "take" else victim.ring.try_recv_many(1)
                assert batch and None not in batch, "the victim heard nothing instead of an error"
                got.extend(batch)
        assert got == sent[: len(got)], "the victim received a message that was not sent at that position"


def test_a_record_overwritten_after_the_victim_found_it_is_not_returned() -> None:
    """The victim finds the record header (next_record), then the producer,
    let in by a forged cursor, overwrites that record before the copy:
    take() raises instead of returning the new lap's bytes."""
    with _victim_and_hostile(L.DATA_OFFSET + 4096, 1000) as (seg, victim, hostile, producer):
        assert producer.try_send(message(0, 1000))
        pos, n = victim.ring.next_record()
        assert (pos, n) == (L.RECORD_HEADER, 1000)
        assert hostile.ring.try_recv() == message(0, 1000)
        for i in range(1, 5):  # 4 records of 1008 bytes a lap: the fifth lands on the first
            victim.cursor.write(producer.write_index)
            assert producer.try_send(message(i, 1000))
            assert hostile.ring.try_recv() == message(i, 1000)
        assert bytes(seg.payload[pos : pos + n]) == message(4, 1000)  # overwritten under the victim
        with pytest.raises(errors.SegmentError, match="overwritten"):
            victim.ring.take()


def test_a_view_torn_by_an_overwrite_raises_on_exit() -> None:
    """receive_view hands out the record in place: a producer let in by a
    forged cursor overwrites it while the caller reads, so the caller sees
    half of one message and half of another.  The exit check raises, and the
    cursor stays on the record (the caller must discard what it read)."""
    from shmbroker._ring.endpoint import Receiver

    seg = Segment(L.DATA_OFFSET + 4096, 1000)
    victim = hostile = None
    try:
        hostile = Member(seg, alone=True)
        slot, page = attach(seg, "victim")
        victim = Receiver(
            seg.control, seg.index_ro, seg.payload, seg.header, "model", slot, page.view,
            seg.state.consumer_efds[slot], seg.state.producer_efd,
        )
        producer = producer_of(seg)
        assert producer.try_send(message(0, 1000))
        with pytest.raises(errors.SegmentError, match="overwritten"):
            with victim.receive_view(timeout=0) as view:
                first = bytes(view[:500])
                for i in range(1, 5):
                    page.write(producer.write_index)
                    assert producer.try_send(message(i, 1000))
                    assert hostile.ring.try_recv() == message(i - 1, 1000)
                torn = first + bytes(view[500:])
                assert torn != message(0, 1000) and torn != message(4, 1000)  # really torn
        assert victim.ring._r == 0
        producer.release()
    finally:
        for r in (victim.ring if victim else None, hostile.ring if hostile else None):
            if r is not None:
                r.release()
        seg.close()


def test_a_later_laps_pad_over_an_unread_message_is_not_stepped_over() -> None:
    """The victim's next record is a small message at the end of the area;
    the producer, let in by a forged cursor, puts the next lap's PAD exactly
    there and stops (the other consumer holds it).  Stepping over that PAD
    would silently skip the message and then deliver the next lap's first
    one, which is intact: the PAD itself must be checked."""
    with _victim_and_hostile(L.DATA_OFFSET + 4096, 1000) as (seg, victim, hostile, producer):
        sent = [message(i, 1000) for i in range(4)] + [message(4, 56)]  # exactly one lap
        for msg in sent:
            assert producer.try_send(msg)
        assert [victim.ring.take() for _ in range(4)] == sent[:4]  # the 56-byte one is unread
        assert hostile.ring.try_recv_many(10) == sent
        victim.cursor.write(producer.write_index)
        for i in range(5, 9):
            assert producer.try_send(message(i, 1000))
        assert not producer.try_send(message(9, 1000))  # the PAD went out, the record waits for the hostile one
        assert producer.write_index == 2 * 4096
        with pytest.raises(errors.SegmentError, match="overwritten"):
            victim.ring.take()


def test_a_producer_without_a_newcomers_page_bounds_itself_by_the_newcomers_start() -> None:
    """Until the producer has fetched a newcomer's cursor page (the broker
    is slow or gone), it must not skip that consumer: it bounds itself by
    the start index the broker wrote into the index page, which the
    newcomer's cursor never goes below.  Once the fetch works, the page's
    cursor lets it go further."""
    seg = Segment(L.DATA_OFFSET + 8192, 1000)
    answering = [True]
    fetch = fetcher(seg)
    try:
        reader = Member(seg, alone=True)
        producer = Impl.producer(
            seg.control, seg.index, seg.payload, seg.header, "model",
            fetch_cursors=lambda: fetch() if answering[0] else None,  # type: ignore[operator]
        )
        for i in range(3):
            assert producer.try_send(message(i, 1000))
        assert len(reader.ring.try_recv_many(10)) == 3
        answering[0] = False
        newcomer = Member(seg, alone=False)
        start = seg.state.starts[newcomer.slot]
        assert start == producer.write_index
        sent = []
        # Bounded: a producer that ignored the newcomer would never be full.
        while len(sent) < 30 and producer.try_send(message(3 + len(sent), 1000)):
            sent.append(message(3 + len(sent), 1000))
            assert reader.ring.try_recv() == sent[-1]  # the other consumer keeps up
        # Bounded by the newcomer's start: a lap of records after it, no more.
        assert producer.write_index <= start + producer.data_size
        assert producer._limit == start + producer.data_size
        got = [newcomer.ring.try_recv() for _ in sent]
        assert got == sent, "the producer overwrote messages of a consumer whose cursor page it lacked"
        # Still no page: the newcomer's progress is invisible, the bound stays.
        assert producer.rescan() == start + producer.data_size
        answering[0] = True
        assert producer.rescan() == newcomer.ring._r + producer.data_size > start + producer.data_size
        assert producer.try_send(message(99, 1000))
        for r in (reader.ring, newcomer.ring, producer):
            r.release()
    finally:
        seg.close()


def test_a_slots_old_page_is_not_trusted_for_its_next_consumer() -> None:
    """The producer holds the page of a slot's earlier occupant, which that
    occupant keeps mapped and writes far forward after it left.  The slot's
    next consumer has a new serial, so the producer uses its start index
    (until it fetches the new page), never the old page."""
    seg = Segment(L.DATA_OFFSET + 8192, 1000)
    answering = [True]
    fetch = fetcher(seg)
    try:
        keeper = Member(seg, alone=True)
        old = Member(seg, alone=False)
        producer = Impl.producer(
            seg.control, seg.index, seg.payload, seg.header, "model",
            fetch_cursors=lambda: fetch() if answering[0] else None,  # type: ignore[operator]
        )
        assert producer.try_send(message(0, 1000))
        keeper.ring.try_recv()
        old.ring.try_recv()
        seg.state.detach(old)
        old.ring.release()
        answering[0] = False
        new = Member(seg, alone=False)
        assert new.slot == old.slot
        old.cursor.write(producer.write_index + 2**20)  # the earlier occupant's forgery
        start = seg.state.starts[new.slot]
        sent = []
        while len(sent) < 30 and producer.try_send(message(1 + len(sent), 1000)):  # bounded, as above
            sent.append(message(1 + len(sent), 1000))
            keeper.ring.try_recv()
        assert producer.write_index <= start + producer.data_size
        assert [new.ring.try_recv() for _ in sent] == sent
        old.cursor.close()
        for r in (keeper.ring, new.ring, producer):
            r.release()
    finally:
        seg.close()


def test_the_broker_bumps_the_generation_after_every_membership_change() -> None:
    """What the producer's consistency check relies on: every attach and
    every detach moves the generation, and a slot's next occupant gets a
    new serial, its start index in the index page and a new cursor page
    (the old one's fd is closed by the broker)."""
    seg = Segment(L.DATA_OFFSET + 8192, 1000)
    try:
        def word(offset: int) -> int:
            return int(L.U64.unpack_from(seg.index_ro, offset)[0])

        g0 = word(L.OFF_MEMBER_GEN)
        first = Member(seg, alone=True)
        assert word(L.OFF_MEMBER_GEN) == g0 + 1
        serial, fd = word(L.serial_offset(first.slot)), seg.state.cursor_fds[first.slot]
        assert serial != 0 and word(L.start_offset(first.slot)) == seg.state.starts[first.slot]
        seg.state.detach(first)
        assert word(L.OFF_MEMBER_GEN) == g0 + 2
        assert seg.state.cursor_fds[first.slot] == -1
        with pytest.raises(OSError):
            os.readlink(f"/proc/self/fd/{fd}")  # closed by the broker (the consumer keeps its mapping)
        producer = producer_of(seg)
        for i in range(3):
            assert producer.try_send(message(i, 100))
        second = Member(seg, alone=True)
        assert second.slot == first.slot and word(L.OFF_MEMBER_GEN) == g0 + 3
        assert word(L.serial_offset(second.slot)) not in (0, serial)
        assert word(L.start_offset(second.slot)) == seg.state.starts[second.slot] == second.cursor.read()
        first.cursor.write(2**40)  # the earlier occupant's page is another object
        assert second.cursor.read() == seg.state.starts[second.slot]
        for r in (first.ring, second.ring, producer):
            r.release()
        first.cursor.close()
        second.cursor.close()
    finally:
        seg.close()


def test_a_slot_freed_and_taken_again_during_a_rescan_is_noticed() -> None:
    """The race the membership generation exists for.  The producer reads a
    consumer's cursor; before it publishes LOW, that consumer leaves and a
    newcomer to the now empty ring takes the same slot, starting at the LOW
    the broker reads (older than that cursor).  The membership word is the
    same before and after (slot byte 1 -> 0 -> 1), so only the generation
    shows the change: the producer must scan again and bound itself by the
    newcomer, which then receives every retained message."""
    seg = Segment(L.DATA_OFFSET + 8192, 1000)
    try:
        old = Member(seg, alone=True)
        producer = producer_of(seg)
        sent = [message(i, 1000) for i in range(3)]
        for msg in sent:
            assert producer.try_send(msg)
        producer.rescan()  # fetches the page; LOW stays where old's cursor was (before any read)
        assert [old.ring.try_recv() for _ in sent] == sent  # old's cursor moves past LOW
        slot = old.slot
        serial, page, words = producer._cursors[slot]  # type: ignore[misc]
        newcomer: list[Member] = []

        class SlotChangesHandsAfterThisRead:
            def __getitem__(self, i: int) -> int:
                value = int(words[i])
                if not newcomer:
                    seg.state.detach(old)
                    newcomer.append(Member(seg, alone=True))
                return value

            def release(self) -> None:
                words.release()

        producer._cursors[slot] = (serial, page, SlotChangesHandsAfterThisRead())  # type: ignore[assignment]
        limit = producer.rescan()
        new = newcomer[0]
        assert new.slot == slot and seg.state.starts[slot] < old.ring._r
        assert limit <= seg.state.starts[slot] + producer.data_size, "the producer kept the departed consumer's bound"
        more = []
        while len(more) < 30 and producer.try_send(message(3 + len(more), 1000)):  # bounded
            more.append(message(3 + len(more), 1000))
        got = list(iter(new.ring.try_recv, None))
        assert got == sent + more
        old.ring.release()
        for r in (new.ring, producer):
            r.release()
    finally:
        seg.close()


def test_a_member_the_broker_has_no_page_for_does_not_make_the_producer_ask_on_every_rescan() -> None:
    """A slot marked as a member without a cursor page at the broker (its
    detach failed half-way: the membership byte stayed).  The producer,
    bounded by that slot's start index, rescans on every spin of a wait;
    it asks the broker once, then backs off instead of sending a request
    per rescan."""
    seg = Segment(L.DATA_OFFSET + 8192, 1000)
    try:
        keeper = Member(seg, alone=True)
        calls = []
        fetch = fetcher(seg)

        def counting() -> object:
            calls.append(1)
            return fetch()  # type: ignore[operator]

        producer = Impl.producer(seg.control, seg.index, seg.payload, seg.header, "model", fetch_cursors=counting)  # type: ignore[arg-type]
        producer.rescan()  # fetches the keeper's page
        calls.clear()
        stale = 7
        assert stale != keeper.slot and seg.state.cursor_fds[stale] < 0
        os.pwrite(seg.state.index_fd, L.U64.pack(3), L.serial_offset(stale))
        os.pwrite(seg.state.index_fd, b"\x01", L.OFF_MEMBERS + stale)
        for _ in range(100):
            producer.rescan()
        assert len(calls) == 1, f"{len(calls)} cursor requests for 100 rescans"
        assert producer._limit <= producer.data_size  # bounded by the stale slot's start index (0)
        for r in (keeper.ring, producer):
            r.release()
    finally:
        seg.close()
