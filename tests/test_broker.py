"""The broker core against a real broker process: segments, handoff, policy."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from helpers import NOBODY, BrokerProc, ChildError, fd_count, lasting_shm_objects, run_in_child
from shmbroker import ShmClient
from shmbroker.errors import ChannelBusy, ChannelNotFound, LimitExceeded, PermissionDenied

from conftest import env_for_copy

O_CLOEXEC = 0o2000000
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a process with another uid")


def write_config(tmp: Path, text: str) -> str:
    path = tmp / "broker.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def mapping_stat(att: Any) -> os.stat_result:
    """stat() of the object behind the client's mapping, through /proc/self/map_files."""
    address = att._mapping.address
    for name in os.listdir("/proc/self/map_files"):
        start, end = (int(x, 16) for x in name.split("-"))
        if start <= address < end:
            return os.stat(f"/proc/self/map_files/{name}")
    raise AssertionError("the mapping is not in /proc/self/map_files")


def broker_leases(pid: int) -> list[str]:
    with open("/proc/locks") as f:
        return [line for line in f if "LEASE" in line and f" {pid} " in line]


def test_producer_and_consumer_share_one_segment(broker: BrokerProc) -> None:
    with ShmClient.attach("frames", "producer", socket_path=broker.socket, size=8192) as prod:
        with ShmClient.attach("frames", "consumer", socket_path=broker.socket) as cons:
            assert (prod.size, cons.size) == (8192, 8192)
            assert prod.generation == cons.generation
            prod.buf[:11] = b"hello world"
            prod.buf[-3:] = b"end"
            assert bytes(cons.buf[:11]) == b"hello world"
            assert bytes(cons.buf[-3:]) == b"end"
            with pytest.raises(TypeError):
                cons.buf[0] = 1  # consumers get a read-only mapping
            peers = broker.status()["channels"][0]["peers"]
            assert sorted(p["role"] for p in peers) == ["consumer", "producer"]
            assert {p["pid"] for p in peers} == {os.getpid()}


def test_segment_is_unlinked_mode_0_and_never_left_in_dev_shm(broker: BrokerProc) -> None:
    with ShmClient.attach("frames", "producer", socket_path=broker.socket, size=4096) as att:
        st = mapping_stat(att)
        assert stat.S_ISREG(st.st_mode)
        assert st.st_nlink == 0, "the segment still has a name someone could open"
        assert stat.S_IMODE(st.st_mode) == 0
        assert lasting_shm_objects() == set()
        # The broker holds exactly one segment fd, and a write lease on it:
        # the proof that nobody else opened the object between create and unlink.
        assert len(broker.segment_fds(expect=1)) == 1
        assert any("WRITE" in line for line in broker_leases(broker.pid))


def test_attach_leaves_only_the_session_socket_open(broker: BrokerProc) -> None:
    before = fd_count(os.getpid())
    att = ShmClient.attach("frames", "producer", socket_path=broker.socket, size=4096)
    assert fd_count(os.getpid()) == before + 1, "the segment fd must be closed once mapped"
    att.close()
    assert fd_count(os.getpid()) == before


def test_sockets_are_cloexec_and_private(broker: BrokerProc) -> None:
    with ShmClient.attach("frames", "producer", socket_path=broker.socket, size=4096):
        sockets = []
        for fd in os.listdir(f"/proc/{broker.pid}/fd"):
            if os.readlink(f"/proc/{broker.pid}/fd/{fd}").startswith("socket:"):
                with open(f"/proc/{broker.pid}/fdinfo/{fd}") as f:
                    flags = int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
                sockets.append(flags)
        # listener, wakeup socketpair, and the accepted session at least
        assert len(sockets) >= 2
        assert all(flags & O_CLOEXEC for flags in sockets)
    directory = os.path.dirname(broker.socket)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert os.stat(directory).st_uid == os.geteuid()


def test_last_detach_wipes_and_frees_the_segment(broker: BrokerProc) -> None:
    prod = ShmClient.attach("frames", "producer", socket_path=broker.socket, size=4096)
    cons = ShmClient.attach("frames", "consumer", socket_path=broker.socket)
    prod.buf[:6] = b"secret"
    prod.close()
    assert len(broker.segment_fds(expect=1)) == 1, "the consumer still holds the channel"
    assert bytes(cons.buf[:6]) == b"secret"
    cons.close()
    assert broker.segment_fds(expect=0) == []
    assert broker.status()["counters"]["segments_wiped"] == 1
    # An on-demand channel disappears with its last peer.
    assert broker.status()["channels"] == []


def test_shutdown_wipes_what_clients_still_map(broker_factory: Any) -> None:
    b = broker_factory()
    att = ShmClient.attach("frames", "producer", socket_path=b.socket, size=4096)
    att.buf[:6] = b"secret"
    b.proc.terminate()
    assert b.proc.wait(10) == 0
    assert bytes(att.buf[:6]) == bytes(6)
    assert att.revoked
    att.close()


def test_channel_rules(broker: BrokerProc) -> None:
    with pytest.raises(ChannelNotFound, match="a producer creates it by attaching with size=N"):
        ShmClient.attach("nothing", "consumer", socket_path=broker.socket)
    with pytest.raises(ChannelNotFound, match="only producers may create"):
        ShmClient.attach("nothing", "consumer", socket_path=broker.socket, size=4096)
    with ShmClient.attach("frames", "producer", socket_path=broker.socket, size=4096):
        with pytest.raises(ChannelBusy, match="exists with size 4096"):
            ShmClient.attach("frames", "consumer", socket_path=broker.socket, size=8192)
    with pytest.raises(LimitExceeded, match="max_segment_size"):
        ShmClient.attach("huge", "producer", socket_path=broker.socket, size=1 << 41)


def test_configured_channel_and_rules(short_tmp: Path, broker_factory: Any) -> None:
    config = write_config(short_tmp, f"""
        [channels.frames]
        size = "64KiB"

        [[rules]]
        uids = [{os.geteuid()}]
        channels = ["frames"]
        roles = ["consumer"]
    """)
    b = broker_factory("--config", config)
    with ShmClient.attach("frames", "consumer", socket_path=b.socket) as att:
        assert att.size == 65536
    with pytest.raises(PermissionDenied, match="producer"):
        ShmClient.attach("frames", "producer", socket_path=b.socket)
    with pytest.raises(PermissionDenied):
        ShmClient.attach("other", "producer", socket_path=b.socket, size=4096)


@ROOT_ONLY
def test_other_uid_cannot_reach_the_private_socket_directory(broker: BrokerProc) -> None:
    with pytest.raises(ChildError) as info:
        run_in_child(lambda: ShmClient.attach("frames", "consumer", socket_path=broker.socket), uid=NOBODY, gid=NOBODY)
    assert info.value.type_name == "PermissionDenied"
    assert "does not admit this user" in info.value.message


@ROOT_ONLY
def test_other_uid_in_the_socket_group_is_refused_by_policy(short_tmp: Path, broker_factory: Any) -> None:
    config = write_config(short_tmp, f"""
        [broker]
        socket_group = {NOBODY}

        [[rules]]
        uids = [0]
        create = true
    """)
    b = broker_factory("--config", config)
    assert stat.S_IMODE(os.stat(os.path.dirname(b.socket)).st_mode) == 0o750

    with pytest.raises(ChildError) as info:
        run_in_child(lambda: ShmClient.attach("frames", "producer", socket_path=b.socket, size=4096), uid=NOBODY, gid=NOBODY)
    assert info.value.type_name == "PermissionDenied"
    assert f"uid {NOBODY}" in info.value.message
    rejected = b.events("peer_rejected")
    assert [e["uid"] for e in rejected] == [NOBODY]
    assert b.status()["channels"] == []


@ROOT_ONLY
def test_supplementary_group_admits_another_uid(short_tmp: Path, broker_factory: Any) -> None:
    group = 4242
    config = write_config(short_tmp, f"""
        [broker]
        socket_group = {NOBODY}

        [[rules]]
        gids = [{group}]
        create = true
    """)
    b = broker_factory("--config", config)

    def attach_with_group() -> int:
        os.setgroups([group])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        with ShmClient.attach("frames", "producer", socket_path=b.socket, size=4096) as att:
            return att.size

    # Executables are not restricted by this rule, so the forked interpreter passes.
    assert run_in_child(attach_with_group) == 4096
    with pytest.raises(ChildError, match="PermissionDenied"):
        run_in_child(lambda: ShmClient.attach("frames", "producer", socket_path=b.socket, size=4096), uid=NOBODY, gid=NOBODY)


def test_other_executable_of_the_same_uid_is_refused(broker: BrokerProc, copied_python: Path) -> None:
    script = (
        "import sys\n"
        "from shmbroker import ShmClient\n"
        "from shmbroker.errors import PermissionDenied\n"
        "try:\n"
        f"    ShmClient.attach('frames', 'producer', socket_path={broker.socket!r}, size=4096)\n"
        "except PermissionDenied as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    proc = subprocess.run([str(copied_python), "-c", script], env=env_for_copy(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "executable" in proc.stdout and str(copied_python) in proc.stdout
    assert broker.status()["channels"] == []
    # The same script under the broker's own interpreter is allowed: the
    # refusal above was about the executable, not the uid or the request.
    ok = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_status_reports_verified_peers(broker: BrokerProc) -> None:
    with ShmClient.attach("frames", "producer", socket_path=broker.socket, size=4096):
        status = broker.status()
    assert status["broker"]["pid"] == broker.pid
    peer = status["channels"][0]["peers"][0]
    assert peer["uid"] == os.geteuid()
    assert peer["exe"] == os.path.realpath(sys.executable)
    assert status["counters"]["attaches"] == 1


def test_views_alive_after_close_read_zeros_and_never_reach_the_segment(broker: BrokerProc) -> None:
    with ShmClient.attach("frames", "producer", socket_path=broker.socket, size=4096) as keeper:
        att = ShmClient.attach("frames", "producer", socket_path=broker.socket)
        view = att.buf[:8]
        att.buf[:8] = b"original"
        att.close()
        assert bytes(view) == bytes(8)
        view[:8] = b"too late"  # lands in private anonymous memory, not the segment
        assert bytes(keeper.buf[:8]) == b"original"


def test_malformed_frame_gets_an_error_and_a_closed_connection(broker: BrokerProc) -> None:
    import socket
    import struct

    from shmbroker._wire import messages as m

    with ShmClient.attach("frames", "producer", socket_path=broker.socket, size=4096) as att:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(broker.socket)
        body = b"\xc1 not msgpack"
        sock.sendall(struct.pack(">I", len(body)) + body)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        sock.close()
        (length,) = struct.unpack(">I", data[:4])
        reply = m.decode(data[4 : 4 + length], m.REPLIES)
        assert isinstance(reply, m.Error) and reply.code == "protocol"
        # The broker keeps serving the others: the existing attachment and a new one.
        assert not att.revoked
        with ShmClient.attach("frames", "consumer", socket_path=broker.socket) as other:
            assert other.size == 4096


def test_a_queued_reply_keeps_its_own_copy_of_each_fd() -> None:
    """Regression for the mix-up found in review: a reply waiting in a send
    queue held the bare fd number of a segment; the segment was revoked and
    closed meanwhile, the number reused for another channel's segment, and
    the reply then carried the wrong segment.  Replies now queue duplicates,
    so the fd that leaves is always the one the reply was made with."""
    from shmbroker._broker.outbox import Outbox, duplicate

    outbox = Outbox()
    segment = os.memfd_create("segment-of-channel-a", os.MFD_CLOEXEC)
    segment_ino = os.fstat(segment).st_ino
    outbox.put_owned(b"reply that waits", duplicate([segment]))
    os.close(segment)  # revoked while the reply waits
    other = os.memfd_create("segment-of-channel-b", os.MFD_CLOEXEC)
    try:
        assert other == segment, "the kernel did not reuse the number; the scenario needs it"
        assert [os.fstat(fd).st_ino for fd in outbox.queued_fds()] == [segment_ino]
    finally:
        outbox.clear()
        os.close(other)
