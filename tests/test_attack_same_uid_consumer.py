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
import signal
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from adversary import RawPeer, hello_attach, wait_until, write_config
from helpers import NOBODY, run_in_child
from shmbroker import ShmClient
from shmbroker._layout import HEADER_SIZE
from shmbroker._sys import prctl
from shmbroker._wire import messages as m

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: runs the broker as another uid")

PR_SET_KEEPCAPS = 8
SECRET = b"the producer's payload"
FORGED = b"a consumer's forgery!!"


@contextmanager
def _broker_as_nobody(tmp: Path, config: str) -> Iterator[str]:
    """A broker forked from this process that drops to uid nobody, keeping only CAP_SYS_PTRACE."""
    home = tmp / "nobody"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    sock = str(home / "run" / "broker.sock")
    log_path = tmp / "broker.log"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            import logging

            from shmbroker._broker.config import load_config
            from shmbroker._broker.loop import Broker
            from shmbroker._logging import TextFormatter

            handler = logging.FileHandler(log_path)
            handler.setFormatter(TextFormatter())
            logging.getLogger("shmbroker").handlers[:] = [handler]
            logging.getLogger("shmbroker").setLevel(logging.DEBUG)
            loaded = load_config(config)
            prctl.prctl(PR_SET_KEEPCAPS, 1)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            ptrace = 1 << prctl.CAP_SYS_PTRACE
            prctl.set_caps(effective=ptrace, permitted=ptrace, inheritable=0)
            Broker(loaded, sock).run()
            code = 0
        except BaseException:
            with open(log_path, "a") as f:
                f.write(traceback.format_exc())
        finally:
            os._exit(code)
    try:
        wait_until(lambda: os.path.exists(sock) or os.waitpid(pid, os.WNOHANG)[0], what="the broker's socket")
        yield sock
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)


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
    with _broker_as_nobody(short_tmp, config) as sock:
        producer: Any = ShmClient.attach("secret", "producer", socket_path=sock)
        try:
            producer.buf[: len(SECRET)] = SECRET
            outcome, detail = run_in_child(lambda: _consumer_forges(sock), uid=NOBODY, gid=NOBODY)
            time.sleep(0.1)
            payload = bytes(producer.buf[: len(SECRET)])
            status = ShmClient.status(socket_path=sock)
        finally:
            producer.close()
    assert payload == SECRET, f"the consumer rewrote the payload ({outcome})"
    assert outcome == "refused", (outcome, detail)
    assert "broker's own uid" in detail and "shmbroker" in detail, detail
    assert any(e["kind"] == "peer_rejected" and e["uid"] == NOBODY for e in status["security_events"])
