"""A5: fd passing.  Clients never send fds; one that does is dropped and
every fd it sent is closed (dbus CVE-2014-3635/3636, CVE-2020-12049).  The
client side treats MSG_CTRUNC as an error and leaks nothing.  A flood from
one uid meets the per-uid connection cap long before the broker's fd limit."""

from __future__ import annotations

import os
import resource
import socket
from pathlib import Path
from typing import Any

import pytest

from adversary import (
    HELLO,
    RawPeer,
    counters,
    error_of,
    policy_toml,
    send_fds_raw,
    stable_fd_count,
    wait_fd_baseline,
    write_config,
)
from helpers import fd_targets, run_in_child
from shmbroker import ShmClient, errors


def _bait_fds(tmp: Path, n: int) -> tuple[str, list[int]]:
    bait = tmp / "fd-bait"
    bait.touch()
    return str(bait), [os.open(bait, os.O_RDONLY | os.O_CLOEXEC) for _ in range(n)]


def _attack(path: str, chunks: list[tuple[bytes, list[int]]]) -> list[Any]:
    peer = RawPeer(path)
    try:
        for data, fds in chunks:
            try:
                send_fds_raw(peer.sock, data, fds) if fds else peer.sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                break  # already dropped
        return peer.replies()
    finally:
        peer.close()


@pytest.mark.parametrize("n", [1, 16, 253])
@pytest.mark.parametrize("shape", ["with-hello", "one-byte", "split-frame"])
def test_client_sending_fds_is_dropped_and_every_fd_closed(broker: Any, short_tmp: Path, n: int, shape: str) -> None:
    good = ShmClient.attach("fdgood", size=4096, socket_path=broker.socket)
    baseline = stable_fd_count(broker.pid)
    bait, fds = _bait_fds(short_tmp, n)
    try:
        if shape == "with-hello":
            chunks = [(HELLO, fds)]
        elif shape == "one-byte":
            chunks = [(b"\x00", fds)]
        else:  # half a frame with half the fds, the rest with the rest
            half = len(HELLO) // 2
            chunks = [(HELLO[:half], fds[: n // 2 or 1]), (HELLO[half:], fds[n // 2 or 1 :])]
        replies = _attack(broker.socket, chunks)
    finally:
        for fd in fds:
            os.close(fd)
    codes = [error_of(r)[0] for r in replies if type(r).__name__ == "Error"]
    assert codes == ["protocol"], replies
    wait_fd_baseline(broker.pid, baseline)
    assert bait not in fd_targets(broker.pid), "the broker kept an fd a client sent it"
    status = broker.status()
    assert status["counters"]["fd_violations"] >= 1
    # Everyone else is still served: the old attachment is intact, new ones work.
    assert not good.revoked
    with ShmClient.attach("fdgood", socket_path=broker.socket, role="consumer"):
        pass
    good.close()


def test_fds_with_no_data_never_reach_the_broker(broker: Any, short_tmp: Path) -> None:
    """On a stream socket the kernel queues nothing for a zero-byte sendmsg,
    SCM_RIGHTS included: documented here so nobody builds on the opposite."""
    baseline = stable_fd_count(broker.pid)
    bait, fds = _bait_fds(short_tmp, 16)
    peer = RawPeer(broker.socket)
    try:
        assert send_fds_raw(peer.sock, b"", fds) == 0
        peer.send(HELLO)
        assert type(peer.reply()).__name__ == "Welcome"
        assert bait not in fd_targets(broker.pid)
    finally:
        peer.close()
        for fd in fds:
            os.close(fd)
    wait_fd_baseline(broker.pid, baseline)


def test_fds_beyond_the_brokers_open_file_limit_are_truncated_and_the_client_dropped(
    broker: Any, short_tmp: Path
) -> None:
    """With the broker near its RLIMIT_NOFILE the kernel installs what fits
    and sets MSG_CTRUNC: the broker must close those and drop the sender."""
    baseline = stable_fd_count(broker.pid)
    old = resource.prlimit(broker.pid, resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir(f"/proc/{broker.pid}/fd"))
    resource.prlimit(broker.pid, resource.RLIMIT_NOFILE, (highest + 8, old[1]))
    bait, fds = _bait_fds(short_tmp, 64)
    try:
        replies = _attack(broker.socket, [(HELLO, fds)])
    finally:
        for fd in fds:
            os.close(fd)
        resource.prlimit(broker.pid, resource.RLIMIT_NOFILE, old)
    assert [error_of(r)[0] for r in replies] == ["protocol"]
    wait_fd_baseline(broker.pid, baseline)
    assert bait not in fd_targets(broker.pid)
    with ShmClient.attach("fdlimit", size=4096, socket_path=broker.socket):
        pass


def test_client_at_its_fd_limit_gets_a_clean_error_and_leaks_nothing(broker: Any) -> None:
    """The segment fd cannot be installed in the client (MSG_CTRUNC)."""

    def client() -> tuple[str, str, list[str], list[str]]:
        before = sorted(os.listdir("/proc/self/fd"))
        # The socket takes the lowest free fd; the one the broker sends would
        # need the next one, which the limit forbids.
        first = os.open(os.devnull, os.O_RDONLY)
        second = os.open(os.devnull, os.O_RDONLY)
        os.close(first)
        os.close(second)
        assert first < second
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (second, hard))
        try:
            ShmClient.attach("ctrunc", size=4096, socket_path=broker.socket)
        except errors.ShmBrokerError as exc:
            outcome = (type(exc).__name__, str(exc))
        else:
            outcome = ("granted", "")
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        after = sorted(os.listdir("/proc/self/fd"))
        return outcome[0], outcome[1], before, after

    kind, message, before, after = run_in_child(client)
    assert kind == "ProtocolError", (kind, message)
    assert "MSG_CTRUNC" in message and "ulimit -n" in message
    assert before == after, "the client leaked an fd"
    assert not [c for c in broker.status()["channels"] if c["name"] == "ctrunc" and c["peers"]]


def test_a_flood_from_one_uid_hits_the_per_uid_cap_not_the_fd_limit(broker_factory: Any, short_tmp: Path) -> None:
    cap = 8
    broker = broker_factory("--config", write_config(short_tmp, policy_toml(limits={"max_connections_per_uid": cap})))
    baseline = stable_fd_count(broker.pid)
    held = [ShmClient.attach("flood", size=4096, socket_path=broker.socket) for _ in range(cap)]
    refused = 0
    peak = 0
    try:
        for _ in range(300):
            try:
                ShmClient.attach("flood", socket_path=broker.socket)
            except errors.LimitExceeded as exc:
                assert f"limit {cap}" in str(exc) and "uid 0" in str(exc)
                refused += 1
            from helpers import fd_count

            peak = max(peak, fd_count(broker.pid))
    finally:
        for a in held:
            a.close()
    assert refused == 300
    # Each attachment costs the broker a socket and a pidfd; a refused
    # connection is closed at once.  Far below any RLIMIT_NOFILE.
    assert peak <= baseline + 2 * cap + 4
    wait_fd_baseline(broker.pid, baseline)
    assert counters(broker.socket)["connections_refused"] >= 300
