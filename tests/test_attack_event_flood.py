"""One uid flooding the security event log (found by the outside red team of
issue 12; docs/attacks.md, A8).

Every connection a uid hands to another process costs it nothing but a fork
and is a security event.  `status` keeps the last 256 events, so 300 of them
used to push out what the operator most needs to see: a panic wipe, a broken
lease, a truncated segment.  Events a peer causes now count against its uid's
burst (refusals_per_uid_burst), and the broker's own events are kept apart.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from adversary import HELLO, PYTHON, RawPeer, hello_attach, wait_until, write_config
from helpers import NOBODY, run_in_child
from shmbroker import ShmClient
from shmbroker._broker.driver import TICK_SECONDS
from shmbroker._layout import HEADER_SIZE
from shmbroker._wire import messages as m
from shmbroker.limits import DEFAULT_LIMITS

FLOOD = 300


def _handed_over_connections(path: str, count: int) -> None:
    """Connect, let a forked child write on the verified connection, wait for the broker to hang up."""
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        pid = os.fork()
        if pid == 0:
            try:
                s.sendall(HELLO)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        s.settimeout(5)
        while s.recv(65536):  # until the broker hangs up on the handed-over connection
            pass
        s.close()


def test_a_flood_of_peer_events_cannot_push_the_brokers_own_events_out_of_status(broker: Any) -> None:
    broker.proc.send_signal(signal.SIGUSR1)
    wait_until(lambda: broker.events("panic_wipe"), what="the panic event")
    _handed_over_connections(broker.socket, FLOOD)
    status = wait_until(
        lambda: (st := broker.status())["counters"].get("identity_changed", 0) >= FLOOD and st,
        what="every hand-over counted",
    )
    kinds = [e["kind"] for e in status["security_events"]]
    assert "panic_wipe" in kinds, "the operator's panic event was pushed out by a peer's flood"
    assert kinds.count("identity_changed") <= DEFAULT_LIMITS.refusals_per_uid_burst
    assert status["counters"]["events_suppressed"] >= FLOOD - DEFAULT_LIMITS.refusals_per_uid_burst


# -- truncations (found by the second red team) ---------------------------------
ROUNDS, PER_ROUND = 6, 50  # 300 truncations: more than status keeps of either queue


def _truncation_config(tmp: Path) -> str:
    """Root may use `vault`; nobody may create and produce on `scratch-*`."""
    return write_config(tmp, f"""
[broker]
socket_group = {NOBODY}
[channels.vault]
size = 65536
[status]
uids = [0]
[[rules]]
uids = [0]
executables = ["{PYTHON}"]
create = true
[[rules]]
uids = [{NOBODY}]
channels = ["scratch-*"]
roles = ["producer"]
create = true
""")


def _truncate_scratch_channels(path: str) -> int:
    """Round after round: attach to PER_ROUND fresh channels with a raw peer
    (which keeps the read-write fd), truncate each, keep the connections
    open past the broker's next tick so it finds every one, then hang up."""
    done = 0
    for _ in range(ROUNDS):
        peers = []
        for i in range(PER_ROUND):
            peer = RawPeer(path)
            peer.send(hello_attach(f"scratch-{i}", size=4096))
            welcome, reply = peer.reply(), peer.reply()
            assert isinstance(welcome, m.Welcome) and isinstance(reply, m.Attached), reply
            os.ftruncate(peer.fds[0], 0)
            done += 1
            peers.append(peer)
        time.sleep(TICK_SECONDS + 0.5)
        for peer in peers:
            peer.close()
    return done


def test_a_truncation_flood_cannot_push_a_lease_break_out_of_status(broker_factory: Any, short_tmp: Path) -> None:
    """Truncations used to be the broker's own events, recorded without a
    uid and without limit: one uid allowed to create posix channels pushed a
    real `lease_broken` out of `status` in seconds.  They are now the doing
    of the uid that held the segment writable, counted against its burst."""
    if os.geteuid() != 0:
        pytest.skip("needs root to open a segment through /proc and to run the attacker as another uid")
    broker = broker_factory("--config", _truncation_config(short_tmp))
    with ShmClient.attach("vault", "producer", socket_path=broker.socket) as holder:
        holder.buf[:6] = b"SECRET"
        (fd,) = broker.segment_fds(expect=1)
        path = f"/proc/{broker.pid}/fd/{fd}"
        # Root opening the segment behind the broker's back: the open waits
        # until the broker has wiped it and let go of the lease.
        assert run_in_child(lambda: os.pread(os.open(path, os.O_RDONLY), 6, HEADER_SIZE)) == bytes(6)
        wait_until(lambda: broker.events("lease_broken"), what="the lease_broken event")
    truncated = run_in_child(lambda: _truncate_scratch_channels(broker.socket), uid=NOBODY, gid=NOBODY, timeout=60)
    assert truncated == ROUNDS * PER_ROUND
    status = wait_until(
        lambda: (st := broker.status())["counters"].get("segment_truncated", 0) >= truncated and st,
        what="every truncation counted",
    )
    kinds = [e["kind"] for e in status["security_events"]]
    assert kinds.count("lease_broken") == 1, "the lease break was pushed out by a peer's truncations"
    kept = [e for e in status["security_events"] if e["kind"] == "segment_truncated"]
    burst = DEFAULT_LIMITS.refusals_per_uid_burst
    assert 0 < len(kept) <= burst
    assert {e["uid"] for e in kept} == {NOBODY} and all(e["channel"].startswith("scratch-") for e in kept)
    assert all(f"uid {NOBODY}" in e["detail"] for e in kept)
    assert status["counters"]["events_suppressed"] >= truncated - burst
    logged = [line for line in broker.log.read_text().splitlines() if "security event segment_truncated" in line]
    assert len(logged) == len(kept)
