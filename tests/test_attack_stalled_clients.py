"""A7: stalled and abusive clients.  Deadlines live in the event loop (no
signal-handler timeouts, cf. OpenSSH CVE-2024-6387); handshakes in flight
are capped (dbus CVE-2014-3639); connections, segments and bytes are capped
per uid; frames and segments have a maximum size."""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import pytest

from adversary import HELLO, RawPeer, error_of, policy_toml, write_config
from shmbroker import ShmClient, errors


def _broker(broker_factory: Any, tmp: Path, **limits: Any) -> Any:
    return broker_factory("--config", write_config(tmp, policy_toml(limits=limits)))


@pytest.mark.parametrize("sent", [b"", HELLO, HELLO[:3]])
def test_handshake_deadline_drops_a_silent_peer(broker_factory: Any, short_tmp: Path, sent: bytes) -> None:
    broker = _broker(broker_factory, short_tmp, handshake_timeout=0.5)
    peer = RawPeer(broker.socket)
    if sent:
        peer.send(sent)
    start = time.monotonic()
    assert peer.closed_by_broker(timeout=5)
    waited = time.monotonic() - start
    peer.close()
    assert 0.3 < waited < 4, waited
    assert broker.status()["counters"]["handshake_timeouts"] >= 1


def test_deadline_error_names_the_limit(broker_factory: Any, short_tmp: Path) -> None:
    broker = _broker(broker_factory, short_tmp, handshake_timeout=0.5)
    peer = RawPeer(broker.socket)
    peer.send(HELLO)
    replies = peer.replies(timeout=5)
    peer.close()
    assert [type(r).__name__ for r in replies] == ["Welcome", "Error"]
    code, message = error_of(replies[1])
    assert code == "timeout" and "0.5s" in message


def test_slowloris_cannot_lock_out_a_legitimate_client(broker_factory: Any, short_tmp: Path) -> None:
    """The attacker holds every handshake slot (and keeps refilling them); a
    legitimate client still attaches well within the handshake deadline."""
    slots = 4
    deadline = 3.0
    broker = _broker(
        broker_factory, short_tmp, max_incomplete_connections=slots, handshake_timeout=deadline,
        max_connections_per_uid=64,
    )
    held = []
    try:
        for _ in range(slots):
            peer = RawPeer(broker.socket)
            peer.send(HELLO[:2])  # half a frame: never completes
            held.append(peer)
        for _ in range(3):
            start = time.monotonic()
            with ShmClient.attach("legit", size=4096, socket_path=broker.socket, timeout=deadline) as att:
                assert not att.revoked
            assert time.monotonic() - start < deadline
            # the attacker refills the slot it lost
            peer = RawPeer(broker.socket)
            peer.send(HELLO[:2])
            held.append(peer)
        status = broker.status()
    finally:
        for peer in held:
            peer.close()
    assert status["counters"]["handshakes_evicted"] >= 3
    assert status["counters"]["attaches"] == 3


def test_connection_cap_per_uid(broker_factory: Any, short_tmp: Path) -> None:
    broker = _broker(broker_factory, short_tmp, max_connections_per_uid=3)
    held = [ShmClient.attach("c", size=4096, socket_path=broker.socket) for _ in range(3)]
    try:
        with pytest.raises(errors.LimitExceeded, match=r"limit 3"):
            ShmClient.attach("c", socket_path=broker.socket)
    finally:
        for a in held:
            a.close()
    ShmClient.attach("c", size=4096, socket_path=broker.socket).close()


def test_segment_cap_per_uid(broker_factory: Any, short_tmp: Path) -> None:
    broker = _broker(broker_factory, short_tmp, max_segments_per_uid=2)
    held = [ShmClient.attach(f"s{i}", size=4096, socket_path=broker.socket) for i in range(2)]
    try:
        with pytest.raises(errors.LimitExceeded, match="max_segments_per_uid"):
            ShmClient.attach("s2", size=4096, socket_path=broker.socket)
    finally:
        for a in held:
            a.close()
    # Released channels give the quota back.
    ShmClient.attach("s2", size=4096, socket_path=broker.socket).close()


def test_max_segment_size(broker_factory: Any, short_tmp: Path) -> None:
    broker = _broker(broker_factory, short_tmp, max_segment_size=65536)
    with pytest.raises(errors.LimitExceeded, match="max_segment_size"):
        ShmClient.attach("big", size=65537, socket_path=broker.socket)
    ShmClient.attach("big", size=65536, socket_path=broker.socket).close()


def test_bytes_quota_per_uid(broker_factory: Any, short_tmp: Path) -> None:
    broker = _broker(broker_factory, short_tmp, max_bytes_per_uid=100 * 1024)
    first = ShmClient.attach("q1", size=64 * 1024, socket_path=broker.socket)
    try:
        with pytest.raises(errors.LimitExceeded, match="max_bytes_per_uid"):
            ShmClient.attach("q2", size=64 * 1024, socket_path=broker.socket)
        ShmClient.attach("q3", size=32 * 1024, socket_path=broker.socket).close()
    finally:
        first.close()


@pytest.mark.parametrize("announced", [1025, 2**31, 2**32 - 1])
def test_oversized_frame_drops_the_client_without_buffering(broker_factory: Any, short_tmp: Path, announced: int) -> None:
    broker = _broker(broker_factory, short_tmp, max_frame_size=1024)
    peer = RawPeer(broker.socket)
    peer.send(struct.pack(">I", announced) + b"\x80" * 64)
    replies = peer.replies()
    peer.close()
    assert len(replies) == 1
    code, message = error_of(replies[0])
    assert code == "protocol" and "1..1024" in message
    with ShmClient.attach("after", size=4096, socket_path=broker.socket):
        pass


def test_a_stalled_attached_client_does_not_block_others(broker: Any) -> None:
    """A client that attaches and then never reads (its receive buffer full
    of nothing we send) costs the loop nothing: others keep attaching."""
    peer = RawPeer(broker.socket)
    peer.send(HELLO)
    peer.reply()
    for i in range(5):
        with ShmClient.attach(f"busy{i}", size=4096, socket_path=broker.socket):
            pass
    peer.close()


def test_full_listen_backlog_gives_a_clean_timeout_not_an_oserror(broker: Any) -> None:
    """With the broker stopped its backlog fills; clients wait until their
    timeout and then get errors.Timeout (not a raw BlockingIOError)."""
    import os
    import signal
    import socket

    os.kill(broker.pid, signal.SIGSTOP)
    fillers = []
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                s.connect(broker.socket)
            except BlockingIOError:
                s.close()
                break
            fillers.append(s)
            assert len(fillers) < 10000
        start = time.monotonic()
        with pytest.raises(errors.Timeout, match="listen backlog is full"):
            ShmClient.attach("backlog", size=4096, socket_path=broker.socket, timeout=0.5)
        assert 0.3 < time.monotonic() - start < 3
    finally:
        os.kill(broker.pid, signal.SIGCONT)
        for s in fillers:
            s.close()
    with ShmClient.attach("backlog", size=4096, socket_path=broker.socket):
        pass


def test_a_full_handshake_table_evicts_the_greediest_uid_first(broker_factory: Any, short_tmp: Path) -> None:
    """Root has one slow handshake of its own; nobody fills every other slot.
    A new root connection evicts one of nobody's, not root's older one."""
    import os

    from adversary import RawPeer as Peer
    from helpers import NOBODY

    slots = 4
    config = policy_toml(uids=(0, NOBODY), socket_group=NOBODY,
                         limits={"max_incomplete_connections": slots, "handshake_timeout": 20.0})
    broker = broker_factory("--config", write_config(short_tmp, config))
    mine = Peer(broker.socket)
    mine.send(HELLO[:2])
    time.sleep(0.2)  # older than all of nobody's
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            held = [Peer(broker.socket) for _ in range(slots - 1)]
            for p in held:
                p.send(HELLO[:2])
            os.write(ready_w, b"x")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        os.read(ready_r, 1)
        time.sleep(0.2)
        with ShmClient.attach("fair", size=4096, socket_path=broker.socket):
            pass
        status = broker.status()
        assert not mine.closed_by_broker(timeout=0.3), "root's own older handshake was evicted"
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
        mine.close()
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)
    assert status["counters"]["handshakes_evicted"] >= 1


def test_total_connection_cap(broker_factory: Any, short_tmp: Path) -> None:
    broker = _broker(broker_factory, short_tmp, max_connections=3)
    held = [ShmClient.attach("t", size=4096, socket_path=broker.socket) for _ in range(3)]
    try:
        with pytest.raises(errors.LimitExceeded, match=r"connection limit \(3\)"):
            ShmClient.attach("t", socket_path=broker.socket)
    finally:
        for a in held:
            a.close()
    ShmClient.attach("t", size=4096, socket_path=broker.socket).close()
