"""Ring channels against hostile peers: the broker never blocks on a peer's
eventfd, a truncated ring wakes and fails its sleepers, no peer can resize
the shared control page, and a client maps only a control page nobody can
resize or reopen."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from adversary import RawPeer, hello_attach, policy_toml, wait_until, write_config
from shmbroker import ShmClient, errors
from shmbroker._layout import LAYOUT_VERSION
from shmbroker._ring import layout as L
from shmbroker._ring.broker import CONSUMER_FD_NAMES, create_control
from shmbroker._ring.client import take_ring_fds
from shmbroker._sys import eventfd, fdpass, memfd
from shmbroker._wire import messages as m


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
    os.ftruncate(hostile.fds[0], 0)
    wait_until(lambda: b.events("segment_truncated"), what="the segment_truncated event")
    thread.join(10)
    assert not thread.is_alive(), "a sleeping consumer was not woken by the revocation"
    assert len(outcome) == 1 and isinstance(outcome[0], errors.ChannelRevoked)
    hostile.close()
    sleeper.close()
    wait_until(lambda: _eventfds(b.pid) == baseline, what="the broker to close the ring's eventfds")


def _control_fds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:shmbroker-ring-control")
        except OSError:
            pass
    return count


@pytest.mark.parametrize("backend", ["posix", "memfd"])
@pytest.mark.parametrize("role", ["producer", "consumer"])
def test_no_peer_can_resize_or_unseal_the_ring_control_page(
    broker_factory: Any, short_tmp: Path, backend: str, role: str
) -> None:
    """Every peer maps the control page writable; if one could truncate it,
    the others' next cursor store would die of SIGBUS."""
    config = policy_toml(channels={"ch": {"size": 65536, "backend": backend, "ring": True}})
    b = broker_factory("--config", write_config(short_tmp, config))
    with ShmClient.attach("ch", "producer" if role == "consumer" else "consumer", socket_path=b.socket) as other:
        hostile = RawPeer(b.socket)
        try:
            hostile.send(hello_attach("ch", role=role, size=None))
            reply = hostile.replies(timeout=0.5)[-1]
            assert isinstance(reply, m.Attached) and reply.fds[1] == "ring.control", reply
            control = hostile.fds[1]
            assert memfd.is_memfd(control)
            assert os.fstat(control).st_size == L.CONTROL_SIZE
            for length in (0, L.CONTROL_SIZE // 2, 2 * L.CONTROL_SIZE):
                with pytest.raises(PermissionError):
                    os.ftruncate(control, length)
            with pytest.raises(PermissionError):
                memfd.add_seals(control, memfd.F_SEAL_WRITE)  # F_SEAL_SEAL: no more changes
            with pytest.raises(OSError):
                os.posix_fallocate(control, 0, 2 * L.CONTROL_SIZE)
            assert os.fstat(control).st_size == L.CONTROL_SIZE
            # The honest peer keeps working on the same control page.
            if role == "consumer":
                other.send(b"still here")
            else:
                with pytest.raises(errors.Empty):
                    other.recv(timeout=0)
        finally:
            hostile.close()
    wait_until(lambda: _control_fds(b.pid) == 0, what="the broker to close the ring's control memfd")


def _ring_reply_and_fds(control: int) -> tuple[m.Attached, list[int]]:
    """What a broker would send a consumer of a ring, with ``control`` as its control fd."""
    segment = memfd.memfd_create("shmbroker")
    fds = [segment, control, eventfd.create(), eventfd.create()]
    reply = m.Attached(
        channel="x", role="consumer", size=65536, generation=1, layout=LAYOUT_VERSION,
        fds=("segment", *CONSUMER_FD_NAMES), ring=True, slot=0,
    )
    return reply, fds


def _sealed_memfd(size: int, seals: int, mode: int = 0) -> int:
    fd = memfd.memfd_create("shmbroker-ring-control")
    os.fchmod(fd, mode)
    os.ftruncate(fd, size)
    memfd.add_seals(fd, seals)
    return fd


def test_client_maps_a_well_formed_control_page() -> None:
    reply, fds = _ring_reply_and_fds(create_control(65536, 1000))
    received = list(fds)
    control, ring_fds = take_ring_fds(reply, fds)
    try:
        assert control is not None and control.writable and len(control.view) == L.CONTROL_SIZE
        assert ring_fds == received[2:] and fds == received[:1]
        with pytest.raises(OSError):
            os.fstat(received[1])  # mapped, then closed: the mapping holds no fd
    finally:
        assert control is not None
        control.close()
        fdpass.close_all(received[:1] + received[2:])


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
def test_client_refuses_a_control_page_a_peer_could_resize_or_open(make: Any, reason: str) -> None:
    """Fail closed before mapping: every fd the broker sent is closed, none is mapped."""
    reply, fds = _ring_reply_and_fds(make())
    received = list(fds)
    with pytest.raises(errors.SegmentError, match=reason):
        take_ring_fds(reply, fds)
    assert fds == []
    for fd in received:
        with pytest.raises(OSError):
            os.fstat(fd)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="ring consumers share one writable control page, so one can move another's cursor (docs/attacks.md, A6)",
)
def test_a_consumer_cannot_make_another_consumer_lose_messages(broker: Any) -> None:
    """A hostile consumer reads everything and, before each send, writes the
    producer's write index into the victim's cursor word.  The producer,
    which must trust cursors, believes the victim caught up and overwrites
    what the victim has not read: the victim loses messages (or finds a
    corrupt ring).  Closing this needs a cursor page per consumer
    attachment (docs/security.md)."""
    kw: dict[str, Any] = {"socket_path": broker.socket}
    with ShmClient.attach("r", "producer", size=16 * 1024, ring=True, max_message=1000, **kw) as p, \
            ShmClient.attach("r", "consumer", **kw) as victim, ShmClient.attach("r", "consumer", **kw) as hostile:
        words = hostile._control.view.cast("Q")
        victim_cursor = L.slot_offset(victim._ring.ring.slot) // 8
        sent = [bytes([i]) * 1000 for i in range(40)]  # 40 kB through a 16 KiB ring
        for msg in sent:
            words[victim_cursor] = p._ring.ring.write_index
            p.send(msg, timeout=2)  # without the forgery: Full, the victim has read nothing
            hostile.recv(timeout=2)
        words.release()
        got = []
        try:
            while True:
                got.append(victim.recv(timeout=0.2))
        except (errors.Empty, errors.SegmentError):
            pass
        assert got == sent, f"the victim received {len(got)} of {len(sent)} messages intact"
