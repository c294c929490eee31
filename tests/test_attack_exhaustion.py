"""One admitted uid exhausting the broker (issue 12, point 3; docs/attacks.md, A8).

The broker used to handle every request of one 64 KiB read at once and to
queue each reply with duplicates of its fds.  A ring producer pipelining
`cursors` requests it never read filled the broker's fd table; the loop then
spun on `accept failed`, other uids could not attach, and the next hang-up
crashed it.  Now a session has one request in flight end to end, the fds of
a reply stay charged to the peer's uid until it has read them, and EMFILE
from outside is met with a reserve fd instead of a spin.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from adversary import RawPeer, frames, policy_toml, stable_fd_count, wait_fd_baseline, write_config
from helpers import NOBODY, fd_count
from shmbroker import ShmClient, errors
from shmbroker._wire import messages as m

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the attacker runs as another uid")

PIPELINED = 20000


def _open_broker(broker_factory: Any, tmp: Path, **limits: Any) -> Any:
    """Root and nobody may attach anything, with any executable."""
    config = policy_toml(uids=(0, NOBODY), executables=None, socket_group=NOBODY, limits=limits or None)
    return broker_factory("--config", write_config(tmp, config))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _attacker(socket_path: str, report_w: int, release_r: int) -> None:
    """As nobody: a ring producer and a consumer, then `cursors` requests
    pipelined on the producer's connection, never reading a reply."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    producer = RawPeer(socket_path)
    producer.send(frames(m.Hello(), m.Attach(channel="abuse", role="producer", size=65536, ring=True)))
    assert isinstance(producer.reply(), m.Welcome) and isinstance(producer.reply(), m.Attached)
    consumer = RawPeer(socket_path)  # so that every cursors reply carries an fd
    consumer.send(frames(m.Hello(), m.Attach(channel="abuse", role="consumer")))
    assert isinstance(consumer.reply(), m.Welcome) and isinstance(consumer.reply(), m.Attached)
    request = frames(m.Cursors())
    producer.sock.setblocking(False)
    sent = 0
    stalled_since = None
    while sent < PIPELINED:
        try:
            producer.sock.send(request)
            sent += 1
            stalled_since = None
        except BlockingIOError:
            # The broker stopped reading from us: our socket buffer is full.
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 1.0:
                break
            time.sleep(0.01)
    os.write(report_w, sent.to_bytes(4, "little"))
    os.read(release_r, 1)
    os._exit(0)  # every socket closes: the hang-up


def test_pipelined_fd_replies_cannot_exhaust_the_broker(broker_factory: Any, short_tmp: Path) -> None:
    broker = _open_broker(broker_factory, short_tmp)
    bystander = ShmClient.attach("bystander", size=4096, socket_path=broker.socket)
    bystander.buf[:5] = b"alive"
    baseline = stable_fd_count(broker.pid)
    report_r, report_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _attacker(broker.socket, report_w, release_r)
        finally:
            os._exit(1)
    os.close(report_w)
    os.close(release_r)
    try:
        sent = int.from_bytes(os.read(report_r, 4), "little")
        assert sent > 0
        peak = fd_count(broker.pid)
        cpu_before = _cpu_seconds(broker.pid)
        # Another uid's attach during the attack: served, and promptly.
        start = time.monotonic()
        with ShmClient.attach("during", size=4096, socket_path=broker.socket, timeout=5) as att:
            assert not att.revoked
        attach_seconds = time.monotonic() - start
        time.sleep(0.5)
        cpu = _cpu_seconds(broker.pid) - cpu_before
    finally:
        os.write(release_w, b"x")
        os.waitpid(pid, 0)
    # The abuser's connections hold a handful of the broker's fds, not thousands.
    assert peak - baseline < 64, (peak, baseline, sent)
    assert attach_seconds < 2, attach_seconds
    assert cpu < 0.4, f"the broker used {cpu:.2f}s of CPU in {0.5 + attach_seconds:.2f}s: it spins"
    # The hang-up of every abusive connection: the broker serves on, the bystander's data is untouched.
    wait_fd_baseline(broker.pid, baseline)
    assert broker.proc.poll() is None
    assert not bystander.revoked and bytes(bystander.buf[:5]) == b"alive"
    status = broker.status()
    assert not status["security_events"], status["security_events"]
    bystander.close()


def test_fd_quota_per_uid_is_a_clear_refusal(broker_factory: Any, short_tmp: Path) -> None:
    """A uid whose connections and channels would pin more of the broker's fds
    than max_fds_per_uid is refused with the limit's name; others are not."""
    broker = _open_broker(broker_factory, short_tmp, max_fds_per_uid=40)
    held = []
    try:
        with pytest.raises(errors.LimitExceeded, match="max_fds_per_uid"):
            for i in range(40):  # a ring channel pins 13 fds, each connection 2
                held.append(ShmClient.attach(f"r{i}", size=65536, ring=True, socket_path=broker.socket))
        assert 1 <= len(held) < 40
    finally:
        for att in held:
            att.close()
    with ShmClient.attach("after", size=65536, ring=True, socket_path=broker.socket):
        pass


def test_out_of_fds_from_outside_the_broker_sheds_instead_of_spinning(broker: Any) -> None:
    """EMFILE that no quota foresaw (an operator lowered RLIMIT_NOFILE): the
    loop closes the waiting connections with its reserve fd, uses no CPU to
    speak of, survives a hang-up, and serves again once fds are back."""
    attached = ShmClient.attach("kept", size=4096, socket_path=broker.socket)
    attached.buf[:4] = b"kept"
    old = resource.prlimit(broker.pid, resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir(f"/proc/{broker.pid}/fd"))
    resource.prlimit(broker.pid, resource.RLIMIT_NOFILE, (highest + 1, old[1]))
    waiting = []
    try:
        cpu_before = _cpu_seconds(broker.pid)
        for _ in range(4):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(broker.socket)  # sits in the backlog; accept() gets EMFILE
            waiting.append(s)
        time.sleep(1.0)
        cpu = _cpu_seconds(broker.pid) - cpu_before
        attached.close()  # a hang-up while out of fds: the close-path re-check must not crash it
        time.sleep(0.3)
        assert broker.proc.poll() is None, broker.log.read_text()
    finally:
        resource.prlimit(broker.pid, resource.RLIMIT_NOFILE, old)
        for s in waiting:
            s.close()
    assert cpu < 0.3, f"the broker used {cpu:.2f}s of CPU in 1s while out of fds: it spins"
    assert broker.status()["counters"].get("connections_shed", 0) >= 1
    with ShmClient.attach("again", size=4096, socket_path=broker.socket) as att:
        assert not att.revoked
    assert "Traceback" not in broker.log.read_text()
