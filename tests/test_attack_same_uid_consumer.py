"""A consumer running as the broker's own uid (issue 12, point 2; docs/attacks.md, A6).

Segments are mode 0, which stops everyone but their owner: the broker's
euid, which created them.  A consumer of that uid may fchmod the read-only
fd it was given and reopen /proc/self/fd/N read-write, then rewrite the
payload every other consumer trusts.  The broker now refuses a consumer-only
rule for its own uid (root excepted) with a reason, instead of promising a
read-only fd the kernel does not enforce.

The broker here runs as uid 65534 (nobody), as a deployment running it as a
user of its own would, keeping CAP_SYS_PTRACE to verify root's producer.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from adversary import RawPeer, hello_attach, write_config
from helpers import NOBODY, run_in_child
from impostor import broker_as
from shmbroker import ShmClient
from shmbroker._layout import HEADER_SIZE
from shmbroker._wire import messages as m

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: runs the broker as another uid")

SECRET = b"the producer's payload"
FORGED = b"a consumer's forgery!!"


def _consumer_forges(sock: str) -> tuple[str, str]:
    """As nobody, the broker's uid: attach read-only with the raw protocol,
    then try to turn the fd writable and forge the payload."""
    peer = RawPeer(sock)
    peer.send(hello_attach("secret", role="consumer", size=None))
    replies = peer.replies(timeout=1.0)
    if not replies or not isinstance(replies[-1], m.Attached):
        error = replies[-1] if replies else None
        peer.close()
        return "refused", getattr(error, "message", repr(error))
    fd = peer.fds[0]
    try:
        os.fchmod(fd, 0o600)  # allowed: this uid owns the inode
        rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        os.pwrite(rw, FORGED, HEADER_SIZE)
        os.close(rw)
        return "forged", ""
    except OSError as exc:
        return "blocked", str(exc)
    finally:
        peer.close()


def test_a_consumer_of_the_brokers_own_uid_cannot_forge_a_read_only_segment(short_tmp: Path) -> None:
    config = write_config(
        short_tmp,
        "[broker]\nsocket_group = 65534\n"
        "[status]\nuids = [0]\n"
        '[channels.secret]\nsize = 65536\nbackend = "memfd"\n'
        "[[rules]]\nuids = [0]\n"
        f'[[rules]]\nuids = [{NOBODY}]\nroles = ["consumer"]\nchannels = ["secret"]\n',
    )
    home = short_tmp / "nobody"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    sock = str(home / "run" / "broker.sock")
    with broker_as(sock, config, short_tmp / "broker.log", uid=NOBODY, gid=NOBODY):
        # Root's producer is told to expect this broker's uid (it is not one of its defaults).
        producer: Any = ShmClient.attach("secret", "producer", socket_path=sock, broker_uid=NOBODY)
        try:
            producer.buf[: len(SECRET)] = SECRET
            outcome, detail = run_in_child(lambda: _consumer_forges(sock), uid=NOBODY, gid=NOBODY)
            time.sleep(0.1)
            payload = bytes(producer.buf[: len(SECRET)])
            status = ShmClient.status(socket_path=sock, broker_uid=NOBODY)
        finally:
            producer.close()
    assert payload == SECRET, f"the consumer rewrote the payload ({outcome})"
    assert outcome == "refused", (outcome, detail)
    assert "broker's own uid" in detail and "shmbroker" in detail, detail
    assert any(
        e["kind"] == "request_refused" and e["uid"] == NOBODY and e["channel"] == "secret" and e["role"] == "consumer"
        for e in status["security_events"]
    )
