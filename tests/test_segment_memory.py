"""Segment memory: locked, excluded from dumps, and zeroized for every client."""

from __future__ import annotations

import logging
import os
import resource
import signal
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_for
from helpers import run_in_child
from shmbroker import ShmClient
from shmbroker._layout import HEADER_SIZE
from shmbroker._sys import memlock
from shmbroker._sys import prctl as sysprctl

CAP_IPC_LOCK = 14
SECRET = b"correct horse battery staple" * 100


def _status_kib(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _vm_flags(address: int) -> list[str]:
    with open("/proc/self/smaps") as f:
        current = False
        for line in f:
            if "-" in line.split()[0] and not line.startswith("VmFlags"):
                start = int(line.split("-")[0], 16)
                current = start == address
            elif current and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise LookupError(hex(address))


def _raw(att: Any) -> bytes:
    return bytes(att._mapping.view)


def test_client_mapping_is_locked_and_not_dumped(broker: Any) -> None:
    """The broker never maps a segment (a truncating peer could SIGBUS it), so
    the locked memory shows in the *client's* VmLck, and the broker's stays 0."""
    size = 1 << 20

    def attach() -> tuple[int, int, list[str], bool]:
        before = _status_kib("self", "VmLck")
        with ShmClient.attach("locked", "producer", socket_path=broker.socket, size=size) as att:
            att.buf[: len(SECRET)] = SECRET
            return before, _status_kib("self", "VmLck"), _vm_flags(att._mapping.address), att._mapping.locked

    before, during, flags, locked = run_in_child(attach)
    assert locked
    assert during - before >= (HEADER_SIZE + size) // 1024
    assert "lo" in flags and "dd" in flags  # VM_LOCKED, VM_DONTDUMP
    assert _status_kib(broker.pid, "VmLck") == 0


def test_mlock_refused_warns_once_and_still_attaches(broker: Any) -> None:
    def attach() -> tuple[bool, bool, list[str]]:
        records: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
        logging.getLogger("shmbroker").addHandler(handler)
        logging.getLogger("shmbroker").setLevel(logging.WARNING)
        # Without CAP_IPC_LOCK, and with a zero limit, mlock must fail.
        eff, prm, inh = sysprctl.get_caps()
        sysprctl.set_caps(eff & ~(1 << CAP_IPC_LOCK), prm & ~(1 << CAP_IPC_LOCK), inh)
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
        with ShmClient.attach("unlocked", "producer", socket_path=broker.socket, size=8192) as a, \
             ShmClient.attach("unlocked", "consumer", socket_path=broker.socket) as b:
            a.buf[:5] = b"hello"
            return a._mapping.locked, bytes(b.buf[:5]) == b"hello", records

    locked, works, records = run_in_child(attach)
    assert not locked and works
    warnings = [r for r in records if "could not mlock" in r]
    assert len(warnings) == 1, records


def test_panic_signal_wipes_every_segment_for_every_client(broker: Any) -> None:
    producers = [ShmClient.attach(f"panic{i}", "producer", socket_path=broker.socket, size=65536) for i in range(2)]
    consumers = [ShmClient.attach(f"panic{i}", "consumer", socket_path=broker.socket) for i in range(2) for _ in range(2)]
    try:
        for p in producers:
            p.buf[: len(SECRET)] = SECRET
        assert all(bytes(c.buf[: len(SECRET)]) == SECRET for c in consumers)
        os.kill(broker.pid, signal.SIGUSR1)
        wait_for(lambda: all(a.revoked for a in producers + consumers), what="revocation after SIGUSR1")
        for att in producers + consumers:
            raw = _raw(att)
            assert raw[: 32] == bytes(32) and raw[40:] == bytes(len(raw) - 40), "segment not zeroized"
        assert broker.events("panic_wipe")
    finally:
        for att in producers + consumers:
            att.close()


def test_sigterm_wipes_before_exit(broker_factory: Any) -> None:
    b = broker_factory()
    producer = ShmClient.attach("bye", "producer", socket_path=b.socket, size=4096)
    consumer = ShmClient.attach("bye", "consumer", socket_path=b.socket)
    try:
        producer.buf[:16] = SECRET[:16]
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(10) == 0
        assert consumer.revoked and bytes(consumer.buf) == bytes(len(consumer.buf))
    finally:
        producer.close()
        consumer.close()


def _config(tmp: Path, rule: str) -> str:
    path = tmp / f"wipe-{rule}.toml"
    path.write_text(
        f"""
[channels.secret]
size = "64KiB"
wipe_when = "{rule}"

[[rules]]
uids = [{os.getuid()}]

[status]
uids = [{os.getuid()}]
"""
    )
    return str(path)


@pytest.mark.parametrize("rule", ["producer_gone", "never"])
def test_liveness_rule_wipes_when_the_last_producer_leaves(broker_factory: Any, short_tmp: Path, rule: str) -> None:
    b = broker_factory("--config", _config(short_tmp, rule))
    p1 = ShmClient.attach("secret", "producer", socket_path=b.socket)
    p2 = ShmClient.attach("secret", "producer", socket_path=b.socket)
    consumer = ShmClient.attach("secret", "consumer", socket_path=b.socket)
    try:
        p1.buf[: len(SECRET)] = SECRET
        p1.close()
        assert not consumer.revoked  # another producer is still there
        p2.close()
        if rule == "producer_gone":
            wait_for(lambda: consumer.revoked, what="liveness wipe")
            assert bytes(consumer.buf) == bytes(len(consumer.buf))
            assert b.status()["counters"]["liveness_wipes"] == 1
        else:
            ShmClient.status(socket_path=b.socket)  # the detach was processed
            assert not consumer.revoked and bytes(consumer.buf[: len(SECRET)]) == SECRET
    finally:
        for att in (p1, p2, consumer):
            att.close()


def test_memlock_limit_raised_to_hard() -> None:
    def raised() -> tuple[int, int]:
        _, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (min(hard, 4096), hard))
        memlock._limit_raised = False
        return memlock.raise_memlock_limit()

    soft, hard = run_in_child(raised)
    assert soft == hard


def test_unknown_liveness_rule_is_refused(short_tmp: Path) -> None:
    from shmbroker._broker.config import load_config
    from shmbroker.errors import ConfigError

    path = Path(_config(short_tmp, "sometimes"))
    with pytest.raises(ConfigError, match=r"channels\.secret\.wipe_when: unknown rule 'sometimes'"):
        load_config(str(path))


def test_release_zeroizes_even_for_a_mapping_kept_by_a_forked_child(broker: Any) -> None:
    """fork() copies a client's MAP_SHARED mapping outside the broker's view;
    when the last session detaches, what that copy reads must be zeros."""
    att = ShmClient.attach("release", "producer", socket_path=broker.socket, size=4096)
    att.buf[: len(SECRET[:64])] = SECRET[:64]
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.read(go_r, 1)
            os.write(out_w, bytes(att._mapping.view[HEADER_SIZE : HEADER_SIZE + 64]))
        finally:
            os._exit(0)
    os.close(go_r)
    os.close(out_w)
    att.close()  # returns once the broker confirmed: release (and wipe) done
    os.write(go_w, b"x")
    seen = os.read(out_r, 64)
    os.waitpid(pid, 0)
    for fd in (go_w, out_r):
        os.close(fd)
    assert seen == bytes(64)


def test_lease_break_wipes_before_the_opener_can_read(broker: Any) -> None:
    """Root opening the unlinked segment through /proc/PID/fd (the only way in)
    breaks the lease; the broker wipes first, so the opener reads zeros."""
    producer = ShmClient.attach("intrude", "producer", socket_path=broker.socket, size=4096)
    consumer = ShmClient.attach("intrude", "consumer", socket_path=broker.socket)
    try:
        producer.buf[:64] = SECRET[:64]
        (fd,) = broker.segment_fds(expect=1)
        with open(f"/proc/{broker.pid}/fd/{fd}", "rb") as intruder:  # blocks until the lease is released
            seen = intruder.read(HEADER_SIZE + 64)
        assert seen[HEADER_SIZE:] == bytes(64)
        assert consumer.revoked and bytes(consumer.buf[:64]) == bytes(64)
        assert broker.events("lease_broken")
    finally:
        producer.close()
        consumer.close()
