"""A4: fail-open.  A peer that vanishes at any point of the handshake or
the attach must never end up with a grant (Polkit CVE-2021-3560 treated a
requester that disconnected mid-lookup as root).  Counters prove the
verification really ran for every connection."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

from adversary import HELLO, RawPeer, counters, hello_attach, policy_toml, write_config, stable_fd_count, wait_fd_baseline
from helpers import NOBODY, run_in_child
from shmbroker.limits import DEFAULT_LIMITS

CHANNEL = "failopen"


def _cut_everywhere(path: str, payload: bytes) -> int:
    """Connect, send the first i bytes, hang up; for every i.  Returns the count."""
    for i in range(len(payload) + 1):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        if i:
            try:
                s.sendall(payload[:i])
            except (BrokenPipeError, ConnectionResetError):
                pass  # a refused uid's connection may be closed before it finished writing
        s.close()
    return len(payload) + 1


def _settled(broker: Any, baseline: int) -> dict[str, Any]:
    wait_fd_baseline(broker.pid, baseline)
    return broker.status()


def test_allowed_peer_hanging_up_at_every_byte_is_never_granted(broker: Any) -> None:
    payload = hello_attach(CHANNEL)
    before = counters(broker.socket)
    baseline = stable_fd_count(broker.pid)
    # Stop one byte short of the full attach: every prefix is an error path.
    n = _cut_everywhere(broker.socket, payload[:-1])
    status = _settled(broker, baseline)
    after = status["counters"]
    assert after.get("attaches", 0) == before.get("attaches", 0) == 0
    # The secure path ran for every one of them (plus our status queries),
    # or the peer was gone before its turn and was dropped unverified.
    verified = after["peers_verified"] - before["peers_verified"]
    dropped = after.get("hung_up_unverified", 0) - before.get("hung_up_unverified", 0)
    assert verified + dropped >= n
    assert not [c for c in status["channels"] if c["name"] == CHANNEL and c["live"]]


def test_hanging_up_right_after_the_attach_request_leaks_nothing(broker: Any) -> None:
    """The broker may still answer (into a closed socket); the segment and
    the fd it sent must then be released at once."""
    baseline = stable_fd_count(broker.pid)
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(broker.socket)
        s.sendall(hello_attach(CHANNEL))
        s.close()
    status = _settled(broker, baseline)
    channels = {c["name"]: c for c in status["channels"]}
    assert CHANNEL not in channels or (not channels[CHANNEL]["live"] and not channels[CHANNEL]["peers"])
    assert not broker.segment_fds(expect=0)


@pytest.fixture
def open_broker(broker_factory: Any, short_tmp: Path) -> Any:
    """Reachable by nobody's group, but its policy allows only root."""
    return broker_factory("--config", write_config(short_tmp, policy_toml(socket_group=NOBODY)))


def test_refused_peer_hanging_up_at_every_byte_is_rejected_every_time(open_broker: Any) -> None:
    broker = open_broker
    payload = hello_attach(CHANNEL)
    before = counters(broker.socket).get("peer_rejected", 0)
    baseline = stable_fd_count(broker.pid)

    def attacker() -> int:
        return _cut_everywhere(broker.socket, payload)

    n = run_in_child(attacker, uid=NOBODY, gid=NOBODY)
    status = _settled(broker, baseline)
    counts = status["counters"]
    # Every connection was refused: up to refusals_per_uid_burst with an
    # answer and a security event each, the rest closed unanswered and counted
    # (a uid no rule names gets no more of the broker's time than that), or
    # dropped because the peer had hung up before the broker looked.
    rejected = counts.get("peer_rejected", 0) - before
    assert rejected <= DEFAULT_LIMITS.refusals_per_uid_burst
    assert rejected + counts.get("connections_dropped", 0) + counts.get("hung_up_unverified", 0) == n
    assert counts.get("attaches", 0) == 0
    assert all(e["uid"] == NOBODY for e in status["security_events"] if e["kind"] == "peer_rejected")


def test_refused_peer_is_told_why_and_gets_no_fd(open_broker: Any) -> None:
    broker = open_broker
    def attacker() -> tuple[list[Any], int]:
        peer = RawPeer(broker.socket)
        peer.send(hello_attach(CHANNEL))
        replies = peer.replies()
        nfds = len(peer.fds)
        peer.close()
        return [(type(r).__name__, getattr(r, "code", None), getattr(r, "message", "")) for r in replies], nfds

    replies, nfds = run_in_child(attacker, uid=NOBODY, gid=NOBODY)
    assert nfds == 0
    assert len(replies) == 1 and replies[0][1] == "permission_denied", replies
    assert f"uid {NOBODY}" in replies[0][2]


def test_every_step_of_the_protocol_then_hang_up(broker: Any) -> None:
    """hello only; hello then garbage; attach without hello; detach first;
    status by a peer without rights: none grants anything, nothing leaks."""
    baseline = stable_fd_count(broker.pid)
    bad = [
        HELLO,
        HELLO + b"\x00\x00\x00\x01\xc1",  # a frame that is not msgpack
        hello_attach(CHANNEL)[len(HELLO):],  # attach before hello
        b"\x00\x00\x00\x00",  # zero-length frame
        b"\xff\xff\xff\xff",  # 4 GiB announced
    ]
    for data in bad:
        peer = RawPeer(broker.socket)
        peer.send(data)
        replies = peer.replies(timeout=0.5 if data == HELLO else 5)
        peer.close()
        assert not any(type(r).__name__ == "Attached" for r in replies)
        assert not peer.fds
    status = _settled(broker, baseline)
    assert status["counters"].get("attaches", 0) == 0
    assert status["counters"].get("protocol_errors", 0) >= 4
    assert os.path.exists(broker.socket)
