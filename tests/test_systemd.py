"""systemd integration against a real broker: notify protocol and socket activation."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import BrokerProc, run_in_child
from shmbroker import ShmClient
from shmbroker._sys import sdlisten

O_CLOEXEC = 0o2000000


def _messages(sock: socket.socket, until: str, timeout: float = 10.0) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if any(until in m.split("\n") for m in got[-1:]):
            return got
    pytest.fail(f"no {until} in {got}")


def test_ready_watchdog_and_stopping_reach_notify_socket(broker_factory: Any, short_tmp: Path) -> None:
    path = short_tmp / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(path))
        b = broker_factory(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
        first = _messages(notify, "READY=1")
        assert first[0].startswith("READY=1\n") and f"MAINPID={b.pid}" in first[0]
        pings = [m for m in _messages(notify, "WATCHDOG=1") if m == "WATCHDOG=1"]
        pings += [m for m in _messages(notify, "WATCHDOG=1") if m == "WATCHDOG=1"]
        assert len(pings) >= 2
        b.proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in _messages(notify, "STOPPING=1")
        assert b.proc.wait(10) == 0


def test_watchdog_for_another_pid_is_ignored(broker_factory: Any, short_tmp: Path) -> None:
    path = short_tmp / "notify2.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(path))
        broker_factory(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"})
        _messages(notify, "READY=1")
        notify.settimeout(0.5)
        with pytest.raises(TimeoutError):
            notify.recv(4096)


def _activated(tmp: Path, sock: socket.socket, *extra: str) -> subprocess.Popen[bytes]:
    """Start `serve` the way systemd does: the socket as fd 3, LISTEN_PID = its pid."""
    log = open(tmp / "activated.log", "w")
    fd = sock.fileno()
    # exec keeps the pid, so the trampoline can name its own pid in LISTEN_PID.
    script = (
        "import os, sys; os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
        f"os.dup2({fd}, 3); os.close({fd}) if {fd} != 3 else None; os.execv(sys.executable, sys.argv[1:])"
    )
    return subprocess.Popen(
        [sys.executable, "-c", script, sys.executable, "-m", "shmbroker", "serve", "-v", *extra],
        pass_fds=(fd,), stdout=subprocess.DEVNULL, stderr=log,
    )


def test_socket_activation_serves_on_the_inherited_socket(short_tmp: Path) -> None:
    path = short_tmp / "act" / "broker.sock"
    path.parent.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    proc = _activated(short_tmp, listener)
    listener.close()  # the broker holds the only copy now, as under systemd
    b = BrokerProc(proc=proc, socket=str(path), log=short_tmp / "activated.log")
    try:
        b.wait_ready()
        with ShmClient.attach("act", "producer", socket_path=path, size=4096) as p, \
             ShmClient.attach("act", "consumer", socket_path=path) as c:
            p.buf[:5] = b"hello"
            assert bytes(c.buf[:5]) == b"hello"
        with open(f"/proc/{proc.pid}/fdinfo/3") as f:
            flags = int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
        assert flags & O_CLOEXEC, "adopted listening socket must be close-on-exec"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, b.log.read_text()
    # systemd owns the socket file: the broker must leave it in place.
    assert path.exists()


def test_socket_activation_refuses_a_datagram_socket(short_tmp: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram:
        proc = _activated(short_tmp, dgram)
        assert proc.wait(15) == 2
    log = (short_tmp / "activated.log").read_text()
    assert "not an AF_UNIX stream socket" in log and "Traceback" not in log


def test_listen_env_is_unset_and_foreign_pid_ignored() -> None:
    def probe() -> tuple[Any, list[str]]:
        os.environ.update(LISTEN_FDS="1", LISTEN_PID="1", LISTEN_FDNAMES="x")
        sock = sdlisten.listen_socket()
        return sock, [k for k in os.environ if k.startswith("LISTEN_")]

    assert run_in_child(probe) == (None, [])


def test_abstract_notify_socket(broker_factory: Any) -> None:
    name = f"shmbroker-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind("\0" + name)
        broker_factory(env={"NOTIFY_SOCKET": "@" + name})
        assert _messages(notify, "READY=1")[0].startswith("READY=1")
