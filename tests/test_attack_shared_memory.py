"""A6: shared memory.  Truncation (SIGBUS), and opening a segment through
/proc/PID/fd.  The broker never maps a segment, so it cannot be SIGBUSed;
peers are protected by seals (memfd backend) or, for posix segments, only
partially (the broker restores the size on its next tick)."""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from adversary import RawPeer, hello_attach, policy_toml, wait_until, write_config
from helpers import NOBODY, mapping_permissions, run_in_child
from shmbroker import ShmClient, errors
from shmbroker._layout import HEADER_SIZE
from shmbroker._sys import memfd
from shmbroker._wire import messages as m

SECRET = b"secret-payload-bytes"


@pytest.fixture(params=["posix", "memfd"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _start(broker_factory: Any, tmp: Path, backend: str) -> Any:
    config = policy_toml(socket_group=NOBODY, channels={"ch": {"size": 65536, "backend": backend}})
    return broker_factory("--config", write_config(tmp, config))


@pytest.fixture
def sm_broker(broker_factory: Any, short_tmp: Path, backend: str) -> Any:
    return _start(broker_factory, short_tmp, backend)


def _hostile_producer(socket_path: str) -> tuple[RawPeer, int]:
    """A producer that keeps the segment fd (the client library closes it)."""
    peer = RawPeer(socket_path)
    peer.send(hello_attach("ch", size=None))
    replies = peer.replies(timeout=0.5)
    assert isinstance(replies[-1], m.Attached), replies
    return peer, peer.fds[0]


def _broker_maps_segments(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return any("shmbroker" in line for line in f)


def _reader(socket_path: str, seconds: float, ready_w: int) -> None:
    """A consumer touching its mapping without pause; dies of SIGBUS if it can."""
    # The death is the expected outcome (an xfail), not a crash to report:
    # keep pytest's faulthandler from printing a "Fatal Python error" dump.
    faulthandler.disable()
    att = ShmClient.attach("ch", role="consumer", socket_path=socket_path)
    os.write(ready_w, b"x")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        bytes(att.buf[:64])
        att.revoked  # noqa: B018 - reads the header page
    att.close()


def _fork_reader(socket_path: str, seconds: float) -> int:
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _reader(socket_path, seconds, ready_w)
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.read(ready_r, 1)
    os.close(ready_r)
    return pid


def test_broker_never_maps_a_segment_and_survives_truncation(sm_broker: Any, backend: str) -> None:
    producer, fd = _hostile_producer(sm_broker.socket)
    try:
        assert not _broker_maps_segments(sm_broker.pid)
        try:
            os.ftruncate(fd, 0)
            truncated = True
        except PermissionError:
            truncated = False
        assert truncated == (backend == "posix")
        if truncated:
            event = wait_until(lambda: sm_broker.events("segment_truncated"), what="segment_truncated")
            assert event[0]["channel"] == "ch"
            # pwrite-wiping restored the size: the old mapping is harmless zeros now.
            assert os.fstat(fd).st_size > HEADER_SIZE
        # Still serving, with a fresh segment when the old one was revoked.
        with ShmClient.attach("ch", role="consumer", socket_path=sm_broker.socket) as att:
            assert not att.revoked
        assert sm_broker.proc.poll() is None
        assert not _broker_maps_segments(sm_broker.pid)
    finally:
        producer.close()


def test_memfd_segment_cannot_be_resized_or_unsealed(broker_factory: Any, short_tmp: Path) -> None:
    sm_broker = _start(broker_factory, short_tmp, "memfd")
    producer, fd = _hostile_producer(sm_broker.socket)
    try:
        assert memfd.is_memfd(fd)
        assert memfd.get_seals(fd) & memfd.SIZE_SEALS == memfd.SIZE_SEALS
        size = os.fstat(fd).st_size
        for length in (0, HEADER_SIZE, size + 4096):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, length)
        with pytest.raises(PermissionError):
            memfd.add_seals(fd, memfd.F_SEAL_WRITE)  # F_SEAL_SEAL: no more changes
        with pytest.raises(OSError):
            os.posix_fallocate(fd, 0, size + 4096)
    finally:
        producer.close()


def test_other_peers_survive_a_hostile_truncation_with_memfd(broker_factory: Any, short_tmp: Path) -> None:
    _assert_reader_survives(_start(broker_factory, short_tmp, "memfd"))


@pytest.mark.xfail(strict=True, reason="shm_open objects cannot be sealed: use backend = \"memfd\" (docs/attacks.md, A6)")
def test_other_peers_survive_a_hostile_truncation_with_posix(broker_factory: Any, short_tmp: Path) -> None:
    _assert_reader_survives(_start(broker_factory, short_tmp, "posix"))


def _assert_reader_survives(broker: Any) -> None:
    """The broker is stopped around the truncation, so the result shows what
    the segment itself guarantees, not how fast the broker repairs it."""
    producer, fd = _hostile_producer(broker.socket)
    reader = _fork_reader(broker.socket, 1.5)
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        try:
            os.ftruncate(fd, 0)
        except PermissionError:
            pass
        time.sleep(1.0)  # the reader keeps touching its mapping meanwhile
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    try:
        _, status = os.waitpid(reader, 0)
    finally:
        producer.close()
    assert not os.WIFSIGNALED(status), f"a peer was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    assert os.WEXITSTATUS(status) == 0


def test_client_refuses_an_unsealed_memfd() -> None:
    """Defence in depth on the client: a memfd without size seals is never mapped."""
    from shmbroker._client import _map_segment
    from shmbroker._layout import LAYOUT_VERSION, Header, segment_length

    fd = memfd.memfd_create("shmbroker")
    os.fchmod(fd, 0)
    os.ftruncate(fd, segment_length(4096))
    os.pwrite(fd, Header(size=4096, generation=1).pack(), 0)
    memfd.add_seals(fd, memfd.F_SEAL_SHRINK)  # GROW and SEAL missing
    reply = m.Attached(channel="x", role="consumer", size=4096, generation=1, layout=LAYOUT_VERSION, fds=("segment",))
    with pytest.raises(errors.SegmentError, match="not sealed"):
        _map_segment(reply, [fd])
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by the client, even on refusal


# -- /proc/PID/fd ------------------------------------------------------------
def _segment_fd(broker: Any, timeout: float = 2.0) -> int:
    # The broker closes its copy of a reply's fd just after sendmsg(2)
    # returns, which can be after the client already received it and moved
    # on: wait for that copy to go before counting.
    deadline = time.monotonic() + timeout
    while True:
        fds = []
        for fd in os.listdir(f"/proc/{broker.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{broker.pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            if "shmbroker" in target and ("/dev/shm/" in target or "memfd:" in target):
                fds.append(int(fd))
        # memfd segments also hold a read-only twin for consumers, opened second.
        if 1 <= len(fds) <= 2 or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    assert 1 <= len(fds) <= 2, fds
    return min(fds)


def test_non_root_cannot_open_the_brokers_segment_through_proc(sm_broker: Any) -> None:
    with ShmClient.attach("ch", socket_path=sm_broker.socket) as att:
        att.buf[: len(SECRET)] = SECRET
        path = f"/proc/{sm_broker.pid}/fd/{_segment_fd(sm_broker)}"

        def snoop() -> str:
            try:
                os.open(path, os.O_RDONLY)
            except PermissionError as exc:
                return os.strerror(exc.errno)
            return "opened"

        assert run_in_child(snoop, uid=NOBODY, gid=NOBODY) == os.strerror(13)  # EACCES
        assert not att.revoked


def _root_snoop(path: str) -> bytes:
    def snoop() -> bytes:
        fd = os.open(path, os.O_RDONLY)  # blocks until the lease holder lets go
        try:
            return os.pread(fd, len(SECRET), HEADER_SIZE)
        finally:
            os.close(fd)

    return run_in_child(snoop, timeout=30)


@pytest.mark.parametrize("whose", ["broker", "client"])
def test_root_opening_a_posix_segment_breaks_the_lease_and_finds_zeros(
    broker_factory: Any, short_tmp: Path, whose: str
) -> None:
    broker = broker_factory("--config", write_config(short_tmp, policy_toml(channels={"ch": {"size": 65536}})))
    consumer = None
    holder = ShmClient.attach("ch", socket_path=broker.socket)
    try:
        holder.buf[: len(SECRET)] = SECRET
        consumer = ShmClient.attach("ch", role="consumer", socket_path=broker.socket)
        if whose == "broker":
            path = f"/proc/{broker.pid}/fd/{_segment_fd(broker)}"
        else:  # the client closed its fd; its mapping is still reachable by root
            with open("/proc/self/maps") as f:
                line = next(ln for ln in f if "/dev/shm/shmbroker-" in ln)
            path = f"/proc/{os.getpid()}/map_files/{line.split()[0]}"
        seen = _root_snoop(path)
        assert seen == bytes(len(SECRET)), "the snooper saw the payload"
        events = broker.events("lease_broken")
        assert events and events[0]["channel"] == "ch"
        assert consumer.revoked and holder.revoked
        with pytest.raises(errors.ChannelRevoked):
            consumer.check()
    finally:
        holder.close()
        if consumer is not None:
            consumer.close()


@pytest.mark.xfail(strict=True, reason="memfds cannot take leases: a root opener is not noticed (docs/attacks.md, A6)")
def test_root_opening_a_memfd_segment_is_noticed(broker_factory: Any, short_tmp: Path) -> None:
    config = policy_toml(channels={"ch": {"size": 65536, "backend": "memfd"}})
    broker = broker_factory("--config", write_config(short_tmp, config))
    with ShmClient.attach("ch", socket_path=broker.socket) as holder:
        holder.buf[: len(SECRET)] = SECRET
        seen = _root_snoop(f"/proc/{broker.pid}/fd/{_segment_fd(broker)}")
        assert seen != SECRET, "root read the payload of a memfd segment unnoticed"


def test_memfd_backend_is_reported_in_status(sm_broker: Any, backend: str) -> None:
    with ShmClient.attach("ch", socket_path=sm_broker.socket):
        channels = {c["name"]: c for c in sm_broker.status()["channels"]}
    assert channels["ch"]["backend"] == backend


def test_memfd_channel_carries_data_like_posix(broker_factory: Any, short_tmp: Path) -> None:
    broker = _start(broker_factory, short_tmp, "memfd")
    with ShmClient.attach("ch", socket_path=broker.socket) as producer, \
            ShmClient.attach("ch", role="consumer", socket_path=broker.socket) as consumer:
        producer.buf[: len(SECRET)] = SECRET
        assert bytes(consumer.buf[: len(SECRET)]) == SECRET
        assert consumer.buf.readonly
    # Released when the last peer left: a new producer sees a fresh, zeroed segment.
    with ShmClient.attach("ch", socket_path=broker.socket) as again:
        assert again.generation == 2 and bytes(again.buf[: len(SECRET)]) == bytes(len(SECRET))


def _consumer_fd(socket_path: str, channel: str) -> tuple[RawPeer, int]:
    """A consumer that keeps the segment fd the broker sends it."""
    peer = RawPeer(socket_path)
    peer.send(hello_attach(channel, role="consumer", size=None))
    replies = peer.replies(timeout=0.5)
    assert isinstance(replies[-1], m.Attached), replies
    return peer, peer.fds[0]


def _try_to_write(fd: int) -> list[str]:
    """Every way a consumer could change the payload through its fd; the ones that worked."""
    import mmap

    worked = []
    try:
        with mmap.mmap(fd, HEADER_SIZE + 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            mm[HEADER_SIZE : HEADER_SIZE + 5] = b"owned"
        worked.append("writable mmap")
    except PermissionError:
        pass
    try:
        os.pwrite(fd, b"owned", HEADER_SIZE)
        worked.append("pwrite")
    except OSError:
        pass
    return worked


@pytest.mark.parametrize(
    "backend, ring",
    [
        ("memfd", False),
        pytest.param("posix", False, marks=pytest.mark.xfail(
            strict=True, reason="a posix object has no read-only fd to give: a second open breaks the lease (docs/attacks.md, A6)")),
        # Ring consumers write only to the ring's control page and their cursor page, memfds of their own.
        ("memfd", True),
        pytest.param("posix", True, marks=pytest.mark.xfail(
            strict=True, reason="posix ring consumers hold the read-write fd too, for the same reason (docs/attacks.md, A6)")),
    ],
)
def test_consumer_cannot_modify_the_payload(broker_factory: Any, short_tmp: Path, backend: str, ring: bool) -> None:
    spec: dict[str, Any] = {"size": 65536, "backend": backend}
    if ring:
        spec["ring"] = True
    b = broker_factory("--config", write_config(short_tmp, policy_toml(channels={"ch": spec})))
    with ShmClient.attach("ch", "producer", socket_path=b.socket) as producer:
        if not ring:
            producer.buf[:6] = b"intact"
        consumer, fd = _consumer_fd(b.socket, "ch")
        try:
            with ShmClient.attach("ch", "consumer", socket_path=b.socket) as reader:
                if ring:
                    producer.send(b"intact")
                assert _try_to_write(fd) == []
                # The library's own consumer maps the segment read-only too:
                # the kernel refuses its writes, not just the memoryview.
                assert mapping_permissions(reader._mapping.address) == "r--s"
                with pytest.raises(TypeError, match="read-only"):
                    reader.buf[:5] = b"owned"
                if ring:
                    assert reader._ring is not None
                    with pytest.raises(TypeError, match="read-only"):
                        reader._ring.ring._data[:5] = b"owned"
                    assert reader.recv(timeout=5) == b"intact"  # and it still receives
                else:
                    assert bytes(reader.buf[:6]) == b"intact"
            if not ring:
                assert bytes(producer.buf[:6]) == b"intact"
        finally:
            consumer.close()


