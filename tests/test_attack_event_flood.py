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
from typing import Any

from adversary import HELLO, wait_until
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
