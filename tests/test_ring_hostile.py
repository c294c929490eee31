"""Ring channels against hostile peers: the broker never blocks on a peer's
eventfd, a truncated ring wakes and fails its sleepers, no peer can resize
the ring's pages, a client maps only pages nobody can resize or reopen, no
consumer can move another's cursor (not even an earlier occupant of its
slot), and only the ring's producer gets the consumers' cursor pages."""

from __future__ import annotations

import dataclasses
import fcntl
import mmap
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from adversary import RawPeer, error_of, frames, hello_attach, policy_toml, wait_until, write_config
from helpers import mapping_permissions
from shmbroker import ShmClient, errors
from shmbroker._layout import LAYOUT_VERSION
from shmbroker._ring import layout as L
from shmbroker._ring.broker import create_control, create_cursor, create_index
from shmbroker._ring.layout import CONSUMER_FD_NAMES
from shmbroker._ring.client import check_page, take_cursor_pages, take_ring_fds
from shmbroker._sys import eventfd, fdpass, memfd
from shmbroker._wire import messages as m

# Every test here runs against the C core and the pure-Python reference.
pytestmark = pytest.mark.usefixtures("ring_impl")


def _eventfds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[eventfd]"
        except OSError:
            pass
    return count


def test_a_consumer_that_makes_its_eventfd_blocking_cannot_freeze_the_broker(broker_factory: Any, short_tmp: Path) -> None:
    config = policy_toml(channels={"ch": {"size": 65536, "ring": True}, "other": {"size": 65536}})
    b = broker_factory("--config", write_config(short_tmp, config))
    with ShmClient.attach("ch", "producer", socket_path=b.socket):
        hostile = ShmClient.attach("ch", "consumer", socket_path=b.socket)
        # O_NONBLOCK lives in the open file description every holder shares.
        kept = os.dup(hostile._ring_fds[0])
        fcntl.fcntl(kept, fcntl.F_SETFL, fcntl.fcntl(kept, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        hostile.close()
        try:
            # The next consumer gets the same slot: the broker resets its
            # eventfd, which must not block with the flag cleared.
            with ShmClient.attach("ch", "consumer", socket_path=b.socket, timeout=3):
                pass
            with ShmClient.attach("other", "consumer", socket_path=b.socket, timeout=3):
                pass
            assert b.status()["broker"]["pid"] == b.pid
        finally:
            os.close(kept)


def _in_syscall(thread: threading.Thread, number: int) -> bool:
    try:
        with open(f"/proc/self/task/{thread.native_id}/syscall") as f:
            return f.read().split()[0] == str(number)
    except (OSError, IndexError):
        return False


def test_truncating_a_ring_wakes_its_sleepers_and_leaks_no_eventfd(broker_factory: Any, short_tmp: Path) -> None:
    config = policy_toml(channels={"ch": {"size": 65536, "backend": "posix", "ring": True}})
    b = broker_factory("--config", write_config(short_tmp, config))
    baseline = _eventfds(b.pid)
    sleeper = ShmClient.attach("ch", "consumer", socket_path=b.socket)
    hostile = RawPeer(b.socket)
    hostile.send(hello_attach("ch", size=None))
    hostile.replies(timeout=0.5)
    outcome: list[BaseException] = []

    def receive() -> None:
        try:
            sleeper.recv(timeout=None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    # Truncate only once the sleeper is inside poll(2) (x86-64 syscall 7):
    # a consumer that touches a truncated posix segment sees the revocation
    # at once through its own SIGBUS guard (docs/attacks.md, A6), without
    # being woken, which is not what this test is about.  The spin before
    # sleeping gives up the GIL, so without this wait the truncation can land
    # while the sleeper still polls memory.
    wait_until(lambda: _in_syscall(thread, 7), what="the sleeper to block in poll(2)")
    os.ftruncate(hostile.fds[0], 0)
    wait_until(lambda: b.events("segment_truncated"), what="the segment_truncated event")
    thread.join(10)
    assert not thread.is_alive(), "a sleeping consumer was not woken by the revocation"
    assert len(outcome) == 1 and isinstance(outcome[0], errors.ChannelRevoked)
    hostile.close()
    sleeper.close()
    wait_until(lambda: _eventfds(b.pid) == baseline, what="the broker to close the ring's eventfds")


def _page_fds(pid: int) -> int:
    """The ring pages (control, index and cursor memfds) ``pid`` holds."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith(
                ("/memfd:shmbroker-ring-control", "/memfd:shmbroker-ring-index", "/memfd:shmbroker-ring-cursor")
            )
        except OSError:
            pass
    return count


@pytest.mark.parametrize("backend", ["posix", "memfd"])
@pytest.mark.parametrize("role", ["producer", "consumer"])
def test_no_peer_can_resize_or_unseal_the_ring_control_page(
    broker_factory: Any, short_tmp: Path, backend: str, role: str
) -> None:
    """Every peer maps the control page writable, the index page, and (a
    consumer writable, the producer read-only) cursor pages; if one could
    truncate any of them, the others' next access would die of SIGBUS."""
    config = policy_toml(channels={"ch": {"size": 65536, "backend": backend, "ring": True}})
    b = broker_factory("--config", write_config(short_tmp, config))
    with ShmClient.attach("ch", "producer" if role == "consumer" else "consumer", socket_path=b.socket) as other:
        hostile = RawPeer(b.socket)
        try:
            hostile.send(hello_attach("ch", role=role, size=None))
            reply = hostile.replies(timeout=0.5)[-1]
            assert isinstance(reply, m.Attached) and reply.fds[1:3] == ("ring.control", "ring.index"), reply
            pages = hostile.fds[1:3]
            if role == "consumer":
                assert reply.fds[3] == "ring.cursor"
                pages.append(hostile.fds[3])
            for page in pages:
                assert memfd.is_memfd(page)
                assert os.fstat(page).st_size == L.CONTROL_SIZE
                for length in (0, L.CONTROL_SIZE // 2, 2 * L.CONTROL_SIZE):
                    with pytest.raises((PermissionError, OSError)):
                        os.ftruncate(page, length)  # EPERM (sealed), or EINVAL on the O_RDONLY index fd
                with pytest.raises(PermissionError):
                    memfd.add_seals(page, memfd.F_SEAL_WRITE)  # F_SEAL_SEAL: no more changes
                with pytest.raises(OSError):
                    os.posix_fallocate(page, 0, 2 * L.CONTROL_SIZE)
                assert os.fstat(page).st_size == L.CONTROL_SIZE
            # The honest peer keeps working on the same control page.
            if role == "consumer":
                other.send(b"still here")
            else:
                with pytest.raises(errors.Empty):
                    other.recv(timeout=0)
        finally:
            hostile.close()
    wait_until(lambda: _page_fds(b.pid) == 0, what="the broker to close the ring's page memfds")


def _ring_reply_and_fds(control: int, index: int, cursor: int | None = None) -> tuple[m.Attached, list[int]]:
    """What a broker would send a consumer of a ring, with ``control``, ``index`` and ``cursor`` as its page fds."""
    segment = memfd.memfd_create("shmbroker")
    fds = [segment, control, index, create_cursor(0) if cursor is None else cursor, eventfd.create(), eventfd.create()]
    reply = m.Attached(
        channel="x", role="consumer", size=65536, generation=1, layout=LAYOUT_VERSION,
        fds=("segment", *CONSUMER_FD_NAMES), ring=True, slot=0, start=0,
    )
    return reply, fds


def _sealed_memfd(size: int, seals: int, mode: int = 0) -> int:
    fd = memfd.memfd_create("shmbroker-ring-control")
    os.fchmod(fd, mode)
    os.ftruncate(fd, size)
    memfd.add_seals(fd, seals)
    return fd


def _index_ro() -> int:
    """A well-formed index page, as consumers get it (the O_RDONLY fd)."""
    rw, ro = create_index(65536, 1000)
    os.close(rw)
    return ro


def test_client_maps_well_formed_ring_pages() -> None:
    reply, fds = _ring_reply_and_fds(create_control(), _index_ro())
    received = list(fds)
    pages, ring_fds = take_ring_fds(reply, fds)
    try:
        assert pages is not None and pages.control.writable and len(pages.control.view) == L.CONTROL_SIZE
        assert not pages.index.writable and len(pages.index.view) == L.INDEX_SIZE
        assert L.parse_static(pages.index.view) == (L.data_size_for(65536), 1000)
        assert pages.cursor is not None and pages.cursor.writable and len(pages.cursor.view) == L.CURSOR_SIZE
        assert ring_fds == received[4:] and fds == received[:1]
        for page in received[1:4]:
            with pytest.raises(OSError):
                os.fstat(page)  # mapped, then closed: the mapping holds no fd
    finally:
        assert pages is not None
        pages.close()
        fdpass.close_all(received[:1] + received[4:])


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: _sealed_memfd(L.CONTROL_SIZE, memfd.F_SEAL_SHRINK), "not sealed against resizing"),
        (lambda: _sealed_memfd(L.CONTROL_SIZE, memfd.F_SEAL_SHRINK | memfd.F_SEAL_GROW), "not sealed against resizing"),
        (lambda: _sealed_memfd(2 * L.CONTROL_SIZE, memfd.SIZE_SEALS), "8192 bytes, expected 4096"),
        (lambda: _sealed_memfd(L.CONTROL_SIZE // 2, memfd.SIZE_SEALS), "2048 bytes, expected 4096"),
        (lambda: _sealed_memfd(L.CONTROL_SIZE, memfd.SIZE_SEALS, mode=0o600), "non-zero mode"),
        (lambda: os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC), "not a memfd"),
        (eventfd.create, "not a memfd"),
    ],
    ids=["shrink-only", "no-seal-seal", "too-large", "too-small", "mode-600", "dev-zero", "eventfd"],
)
@pytest.mark.parametrize("page", ["control", "index", "cursor"])
def test_client_refuses_a_ring_page_a_peer_could_resize_or_open(make: Any, reason: str, page: str) -> None:
    """Fail closed before mapping: every fd the broker sent is closed, none is mapped."""
    if page == "control":
        reply, fds = _ring_reply_and_fds(make(), _index_ro())
    elif page == "index":
        reply, fds = _ring_reply_and_fds(create_control(), make())
    else:
        reply, fds = _ring_reply_and_fds(create_control(), _index_ro(), make())
    if page != "control":
        reason = f"{page} page.*{reason}|{reason}.*{page} page" if reason != "not a memfd" else f"{page} page that is not a memfd"
    received = list(fds)
    with pytest.raises(errors.SegmentError, match=reason):
        take_ring_fds(reply, fds)
    assert fds == []
    for fd in received:
        with pytest.raises(OSError):
            os.fstat(fd)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: _sealed_memfd(L.CURSOR_SIZE, memfd.F_SEAL_SHRINK | memfd.F_SEAL_GROW), "cursor page that is not sealed"),
        (lambda: _sealed_memfd(2 * L.CURSOR_SIZE, memfd.SIZE_SEALS), "cursor page is 8192 bytes"),
        (lambda: _sealed_memfd(L.CURSOR_SIZE, memfd.SIZE_SEALS, mode=0o600), "cursor page is linked or has a non-zero mode"),
        (lambda: os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC), "cursor page that is not a memfd"),
    ],
    ids=["no-seal-seal", "too-large", "mode-600", "dev-zero"],
)
def test_client_refuses_a_cursor_page_reply_a_peer_could_resize_or_open(make: Any, reason: str) -> None:
    """The cursor pages a producer fetches get the checks of every ring
    page: one bad page of several fails the whole reply, every fd closed,
    nothing left mapped."""
    good, bad = create_cursor(0), make()
    reply = m.CursorPages(slots=(0, 1), serials=(1, 2))
    with pytest.raises(errors.SegmentError, match=reason):
        take_cursor_pages(reply, [good, bad])
    for fd in (good, bad):
        with pytest.raises(OSError):
            os.fstat(fd)


@pytest.mark.parametrize(
    ("slots", "serials", "count"), [((0,), (1,), 2), ((0, 1), (1,), 2), ((8,), (1,), 1), ((0,), (0,), 1)],
    ids=["extra-fd", "missing-serial", "slot-8", "serial-0"],
)
def test_client_refuses_a_cursor_page_reply_that_does_not_add_up(slots: Any, serials: Any, count: int) -> None:
    fds = [create_cursor(0) for _ in range(count)]
    with pytest.raises(errors.ProtocolError):
        take_cursor_pages(m.CursorPages(slots=slots, serials=serials), list(fds))
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


@pytest.mark.parametrize("start", [None, 12])
def test_client_refuses_a_ring_consumer_reply_without_a_usable_start_index(start: int | None) -> None:
    """Without the start index in the reply the consumer would take it from
    the control page, which every consumer of the ring can write."""
    reply, fds = _ring_reply_and_fds(create_control(), _index_ro())
    reply = dataclasses.replace(reply, start=start)
    received = list(fds)
    with pytest.raises(errors.ProtocolError, match="start index"):
        take_ring_fds(reply, fds)
    assert fds == []
    for fd in received:
        with pytest.raises(OSError):
            os.fstat(fd)


def _index_page_writes(fd: int) -> list[str]:
    """Every way a consumer could change the ring's index page through its fd; the ones that worked.
    Modelled on test_attack_shared_memory._try_to_write."""
    import mmap

    worked = []
    try:
        with mmap.mmap(fd, L.INDEX_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            L.U64.pack_into(mm, L.OFF_WRITE, 8)
        worked.append("writable mmap")
    except PermissionError:
        pass
    try:
        os.pwrite(fd, L.U64.pack(8), L.OFF_WRITE)
        worked.append("pwrite")
    except OSError:
        pass
    return worked


@pytest.mark.parametrize("backend", ["posix", "memfd"])
def test_a_consumer_cannot_write_the_ring_index_page(broker_factory: Any, short_tmp: Path, backend: str) -> None:
    """The write index, LOW, the reserve index and the producer's flag live
    in the index page, which consumers get as an O_RDONLY fd (for both
    segment backends: the page is a memfd of its own), so no consumer can
    forge an index another consumer trusts."""
    config = policy_toml(channels={"ch": {"size": 65536, "backend": backend, "ring": True}})
    b = broker_factory("--config", write_config(short_tmp, config))
    with ShmClient.attach("ch", "producer", socket_path=b.socket) as producer:
        hostile = RawPeer(b.socket)
        try:
            hostile.send(hello_attach("ch", role="consumer", size=None))
            reply = hostile.replies(timeout=0.5)[-1]
            assert isinstance(reply, m.Attached) and reply.fds[2] == "ring.index", reply
            assert _index_page_writes(hostile.fds[2]) == []
            with ShmClient.attach("ch", "consumer", socket_path=b.socket) as reader:
                assert reader._pages is not None and reader._ring is not None
                assert mapping_permissions(reader._pages.index.address) == "r--s"
                with pytest.raises(TypeError, match="read-only"):
                    reader._ring.ring._iw[L.OFF_WRITE // 8] = 8
                producer.send(b"intact")
                assert reader.recv(timeout=5) == b"intact"  # and it still receives
        finally:
            hostile.close()


def _send_through(p: Any, victim: Any, sent: list[bytes], got: list[bytes], msg: bytes) -> None:
    """Send ``msg``; when the ring is full (the victim has not read), let the
    victim catch up first.  The honest outcome: the producer waits for the
    victim, whose messages all arrive."""
    try:
        p.send(msg, timeout=0)
    except errors.Full:
        got.extend(victim.recv_many(1000, timeout=2))
        p.send(msg, timeout=2)
    sent.append(msg)


def _drain(att: Any) -> list[bytes]:
    got = []
    try:
        while True:
            got.extend(att.recv_many(1000, timeout=0.2))
    except errors.Empty:
        pass
    return got


def test_a_consumer_cannot_make_another_consumer_lose_messages(broker: Any) -> None:
    """A hostile consumer reads everything and, before each send, writes the
    producer's write index into every word of the shared control page it
    can write (where ring layout 3 kept the cursors).  Cursors now live in
    a page per consumer attachment that no other consumer holds, so the
    producer still waits for the victim, and the victim receives every
    message (without the fix: a SegmentError, and the messages are lost)."""
    kw: dict[str, Any] = {"socket_path": broker.socket}
    with ShmClient.attach("r", "producer", size=16 * 1024, ring=True, max_message=1000, **kw) as p, \
            ShmClient.attach("r", "consumer", **kw) as victim, ShmClient.attach("r", "consumer", **kw) as hostile:
        words = hostile._control.view.cast("Q")
        sent: list[bytes] = []
        got: list[bytes] = []
        for i in range(40):  # 40 kB through a 16 KiB ring
            for k in range(len(words)):  # the sleeping flags too: clearing one only delays a wake-up
                words[k] = p._ring.ring.write_index
            _send_through(p, victim, sent, got, bytes([i]) * 1000)
            hostile.recv(timeout=2)
        words.release()
        got.extend(_drain(victim))
        assert got == sent, f"the victim received {len(got)} of {len(sent)} messages intact"


def test_an_earlier_occupant_of_the_slot_cannot_move_the_new_consumers_cursor(broker: Any) -> None:
    """A consumer detaches but keeps its cursor page (its fd; a mapping
    would do as well: munmap is voluntary).  The producer had fetched that
    page.  A new consumer takes the same slot; before each send the earlier
    occupant writes a far-forward cursor into its old page.  The producer
    trusts only the page of the slot's current attachment (its serial), so
    it does not overwrite the newcomer's unread messages."""
    kw: dict[str, Any] = {"socket_path": broker.socket}
    with ShmClient.attach("r", "producer", size=16 * 1024, ring=True, max_message=1000, **kw) as p, \
            ShmClient.attach("r", "consumer", **kw) as keeper:
        earlier = RawPeer(broker.socket)
        try:
            earlier.send(hello_attach("r", role="consumer", size=None))
            reply = earlier.reply()
            reply = earlier.reply() if isinstance(reply, m.Welcome) else reply
            assert isinstance(reply, m.Attached) and reply.fds[3] == "ring.cursor", reply
            old_slot, old_page = reply.slot, earlier.fds[3]
            # Fill the ring once: the producer rescans and fetches every
            # current page, the earlier occupant's included.
            for i in range(40):
                p.send(bytes([i]) * 1000, timeout=2)
                keeper.recv(timeout=2)
                os.pwrite(old_page, L.U64.pack(p._ring.ring.write_index), L.OFF_CURSOR)  # it keeps up
            assert p._ring.ring._cursors[old_slot] is not None, "the producer never fetched the earlier occupant's page"
            # Detach, keeping the page: closing our end of the connection detaches us.
            earlier.sock.close()
            wait_until(lambda: p._ring.ring._iw[L.OFF_MEMBERS // 8] >> (8 * old_slot) & 0xFF == 0, what="the detach")
            with ShmClient.attach("r", "consumer", **kw) as victim, \
                    mmap.mmap(old_page, L.CURSOR_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as forged:
                assert victim._ring.ring.slot == old_slot
                sent: list[bytes] = []
                got: list[bytes] = []
                for i in range(40):
                    L.U64.pack_into(forged, L.OFF_CURSOR, p._ring.ring.write_index + 2**20)
                    _send_through(p, victim, sent, got, bytes([i]) * 1000)
                    keeper.recv(timeout=2)
                got.extend(_drain(victim))
                assert got == sent, f"the new consumer received {len(got)} of {len(sent)} messages intact"
        finally:
            earlier.close()


def _cursor_request(peer: RawPeer) -> m.Message:
    before = len(peer.fds)
    # A fresh client connection has no conversation state: it sends what it is told.
    peer.send(frames(m.Cursors()))
    reply = peer.reply(timeout=5)
    if not isinstance(reply, m.CursorPages):
        assert len(peer.fds) == before, "the broker sent fds with a refusal"
    return reply


def test_only_the_rings_producer_gets_the_cursor_pages(broker: Any) -> None:
    """The cursor pages let whoever holds them read every consumer's cursor
    (and the pages must never reach a consumer writable).  The broker sends
    them to the producer of that ring only: a consumer of the ring and the
    producer of another channel are refused; a session without an
    attachment breaks the protocol."""
    kw: dict[str, Any] = {"socket_path": broker.socket}
    with ShmClient.attach("r", "producer", size=16 * 1024, ring=True, max_message=1000, **kw), \
            ShmClient.attach("r", "consumer", **kw), \
            ShmClient.attach("raw", "producer", size=4096, **kw):
        peers = []
        try:
            consumer = RawPeer(broker.socket)
            peers.append(consumer)
            consumer.send(hello_attach("r", role="consumer", size=None))
            assert isinstance(consumer.reply(), m.Welcome) and isinstance(consumer.reply(), m.Attached)
            code, message = error_of(_cursor_request(consumer))
            assert code == "permission_denied" and "only the producer" in message, message

            other = RawPeer(broker.socket)
            peers.append(other)
            other.send(hello_attach("raw2", role="producer", size=4096))
            assert isinstance(other.reply(), m.Welcome) and isinstance(other.reply(), m.Attached)
            code, message = error_of(_cursor_request(other))
            assert code == "permission_denied", message

            lone = RawPeer(broker.socket)
            peers.append(lone)
            lone.send(frames(m.Hello()))
            assert isinstance(lone.reply(), m.Welcome)
            code, message = error_of(_cursor_request(lone))
            assert code == "protocol" and "cursors without an attachment" in message, message
            assert lone.closed_by_broker()
        finally:
            for peer in peers:
                peer.close()


def test_the_producer_gets_each_consumers_own_cursor_page(broker: Any) -> None:
    """One page per attached consumer, under its slot and a serial of its
    own, each a sealed mode-0 memfd holding that consumer's cursor."""
    producer = RawPeer(broker.socket)
    try:
        producer.send(frames(m.Hello(), m.Attach(channel="r", role="producer", size=16 * 1024, ring=True, max_message=1000)))
        assert isinstance(producer.reply(), m.Welcome) and isinstance(producer.reply(), m.Attached)
        kw: dict[str, Any] = {"socket_path": broker.socket}
        with ShmClient.attach("r", "consumer", **kw) as a, ShmClient.attach("r", "consumer", **kw) as b:
            before = len(producer.fds)
            reply = _cursor_request(producer)
            assert isinstance(reply, m.CursorPages), reply
            assert reply.slots == (a._ring.ring.slot, b._ring.ring.slot)
            assert len(set(reply.serials)) == 2 and 0 not in reply.serials
            pages = producer.fds[before:]
            assert len(pages) == 2
            for fd in pages:
                check_page(fd, "cursor page", L.CURSOR_SIZE)
                assert os.pread(fd, 8, L.OFF_CURSOR) == L.U64.pack(0)
            # The consumer's own page: what it writes is what the producer reads.
            a._ring.ring._r = 8
            a._ring.ring.publish_cursor()
            assert os.pread(pages[0], 8, L.OFF_CURSOR) == L.U64.pack(8)
    finally:
        producer.close()


def _receive(att: Any, how: str) -> list[bytes]:
    if how == "recv":
        return [att.recv(timeout=0.2)]
    if how == "recv_many":
        # One at a time: a batch that goes on to reload the write index would
        # find the lap anyway and drop the whole batch.
        return att.recv_many(1, timeout=0.2)  # type: ignore[no-any-return]
    with att.receive_view(timeout=0.2) as view:
        data = bytes(view)
    return [data]  # only once the exit check passed


@pytest.mark.parametrize("how", ["recv", "recv_many", "receive_view"])
def test_a_consumer_whose_cursor_was_moved_behind_its_back_gets_an_error_not_a_wrong_message(
    broker: Any, how: str
) -> None:
    """The defence in depth behind the cursor pages, through a live broker.
    Since ring layout 4 no other consumer can move the victim's cursor
    (test_a_consumer_cannot_make_another_consumer_lose_messages); whatever
    still could (a bug in the victim's own process, which holds its page)
    makes the producer lap it.  The victim first reads one of two published
    messages, so it holds a cached write index and reads the next record
    without reloading it: only the reserve index tells it the record is
    from a later lap.  Everything it receives is exactly what was sent at
    that position; then it gets a SegmentError, not silence and not a
    stale message."""
    kw: dict[str, Any] = {"socket_path": broker.socket}
    with ShmClient.attach("r", "producer", size=16 * 1024, ring=True, max_message=1000, **kw) as p, \
            ShmClient.attach("r", "consumer", **kw) as victim, ShmClient.attach("r", "consumer", **kw) as hostile:
        sent = [i.to_bytes(2, "little") * 500 for i in range(40)]  # 40 kB through a 16 KiB ring
        p.send(sent[0])
        p.send(sent[1])
        got = victim.recv_many(1) if how == "recv_many" else _receive(victim, how)
        assert got == sent[:1]
        assert hostile.recv_many(2) == sent[:2]
        words = victim._cursor.view.cast("Q")
        victim_cursor = L.OFF_CURSOR // 8
        for msg in sent[2:]:
            words[victim_cursor] = p._ring.ring.write_index
            p.send(msg, timeout=2)  # without the forgery: Full, the victim has read one message
            assert hostile.recv(timeout=2) == msg
        words.release()
        with pytest.raises(errors.SegmentError, match="overwritten before this consumer read them"):
            while True:
                got.extend(_receive(victim, how))  # errors.Empty (silence) fails the test
        assert got == sent[: len(got)], "the victim received a message that was not sent at that position"


def test_a_consumer_clearing_anothers_sleeping_flag_only_delays_its_wake_up(broker: Any) -> None:
    """The residual of the shared control page: a hostile consumer clears
    the flag of a consumer asleep in poll(2), so the producer's send does
    not wake it.  Its periodic re-check (CONSUMER_RECHECK_SECONDS) still
    finds the message: delayed, never lost (docs/ring.md, "Robustness")."""
    kw: dict[str, Any] = {"socket_path": broker.socket}
    with ShmClient.attach("r", "producer", size=16 * 1024, ring=True, max_message=1000, **kw) as p, \
            ShmClient.attach("r", "consumer", **kw) as victim, ShmClient.attach("r", "consumer", **kw) as hostile:
        got: list[Any] = []

        def receive() -> None:
            try:
                got.append(victim.recv(timeout=10))
            except BaseException as exc:
                got.append(exc)

        thread = threading.Thread(target=receive, daemon=True)
        thread.start()
        wait_until(lambda: _in_syscall(thread, 7), what="the victim to block in poll(2)")
        flags = hostile._control.view
        flag = L.OFF_SLEEPING + victim._ring.ring.slot
        flags[flag] = 0  # the attack
        p.send(b"late, not lost")
        thread.join(10)
        assert got == [b"late, not lost"]
        assert hostile.recv(timeout=2) == b"late, not lost"


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_a_producer_that_cannot_fetch_a_cursor_page_stays_within_the_newcomers_start(
    broker_factory: Any, fault: str
) -> None:
    """A consumer joins; the broker stops answering (stopped: the fetch
    times out) or dies (the fetch fails) before the producer fetched the
    newcomer's page.  Another consumer keeps up, yet the producer bounds
    itself by the newcomer's start index: a ring's worth of messages, all
    delivered, then Full, never an overwrite.  A stopped broker that
    resumes answers the late request and the next one, and the producer
    goes on."""
    b = broker_factory()
    kw: dict[str, Any] = {"socket_path": b.socket}
    p = ShmClient.attach("r", "producer", size=16 * 1024, ring=True, max_message=1000, **kw)
    keeper = ShmClient.attach("r", "consumer", **kw)
    c = None
    try:
        for i in range(40):  # a few laps: the producer fetches the keeper's page
            p.send(bytes(1000), timeout=2)
            keeper.recv(timeout=2)
        assert p._ring.ring._cursors[keeper._ring.ring.slot] is not None
        c = ShmClient.attach("r", "consumer", **kw)
        start = c._ring.ring._r
        os.kill(b.pid, getattr(signal, fault))
        if fault == "SIGKILL":
            b.proc.wait()
        try:
            sent = []
            for i in range(40):  # bounded: a producer that ignored the newcomer would never be full
                msg = i.to_bytes(2, "little") * 500
                try:
                    p.send(msg, timeout=0)
                except errors.Full:
                    break
                sent.append(msg)
                assert keeper.recv(timeout=2) == msg
            assert 0 < len(sent) < 40
            assert p._ring.ring.write_index <= start + p._ring.ring.data_size
            assert _drain(c) == sent, "the newcomer lost messages while the producer had no cursor page"
            with pytest.raises(errors.Full):
                p.send(b"still bounded by the start index", timeout=0)
        finally:
            if fault == "SIGSTOP":
                os.kill(b.pid, signal.SIGCONT)
        if fault == "SIGSTOP":
            p.send(b"after the stall", timeout=10)  # the retry collects both replies
            assert c.recv(timeout=5) == b"after the stall"
            assert p._ring.ring._cursors[c._ring.ring.slot] is not None
    finally:
        for att in (p, keeper, c):
            if att is not None:
                att.close()
