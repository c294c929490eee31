"""A1: PID reuse.  SO_PEERCRED's pid is frozen at connect(); by the time the
broker looks at /proc/PID the connecting process may be gone and the pid
recycled by another, allowed, program.  The broker pins the connecting
process with SO_PEERPIDFD and checks the pidfd *after* the /proc read."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from adversary import (
    InProcessBroker,
    RawPeer,
    can_recycle_pids,
    counters,
    error_of,
    hello_attach,
    inprocess_broker,
    policy_toml,
    reap,
    recycle_pid,
    write_config,
)
from conftest import env_for_copy

# Runs under a copy of the interpreter: an executable the policy does not allow.
ATTACKER = r"""
import array, os, socket, sys, time
path, back_fd, payload, linger = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
s.sendall(payload)
if back_fd >= 0:
    back = socket.socket(fileno=back_fd)
    back.sendmsg([str(os.getpid()).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno()]))])
if linger == "yes":
    time.sleep(60)
"""


def _hand_back(copied_python: Path, sock_path: str, payload: bytes) -> tuple[int, socket.socket]:
    """Run the attacker to completion (it exits and is reaped); keep its socket."""
    ours, theirs = socket.socketpair()
    with ours:
        subprocess.run(
            [str(copied_python), "-c", ATTACKER, sock_path, str(theirs.fileno()), payload.hex(), "no"],
            pass_fds=[theirs.fileno()], env=env_for_copy(), check=True, timeout=30,
        )
        theirs.close()
        data, anc, _, _ = ours.recvmsg(32, socket.CMSG_SPACE(4))
    fd = int.from_bytes(anc[0][2][:4], "little")
    return int(data), socket.socket(fileno=fd)


def test_reaped_peer_is_rejected_even_when_its_pid_was_recycled(
    broker_factory: Any, copied_python: Path, short_tmp: Path
) -> None:
    """The attacker (a disallowed executable) connects while the broker is
    stopped, passes its socket on and exits; its pid goes to an allowed
    program before the broker looks.  A /proc-only check would admit it."""
    if not can_recycle_pids():
        pytest.skip("recycling a pid needs root and a writable /proc/sys/kernel/ns_last_pid")
    broker = broker_factory("--config", write_config(short_tmp, policy_toml()))
    os.kill(broker.pid, signal.SIGSTOP)
    recycled = None
    try:
        dead_pid, sock = _hand_back(copied_python, broker.socket, hello_attach("a1"))
        recycled = recycle_pid(dead_pid)
        assert recycled == dead_pid, "could not recycle the attacker's pid (machine too busy?)"
        assert os.path.realpath(f"/proc/{dead_pid}/exe") != str(copied_python)  # now an allowed program
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    try:
        peer = RawPeer.adopt(sock)
        code, message = error_of(peer.reply())
        assert code == "permission_denied"
        assert "stale pid" in message
        assert not peer.fds, "the broker handed a segment to a recycled pid"
        peer.close()
    finally:
        if recycled:
            reap(recycled)
    status = broker.status()
    assert status["counters"].get("attaches", 0) == 0
    rejected = [e for e in status["security_events"] if e["kind"] == "peer_rejected"]
    assert [e["pid"] for e in rejected] == [dead_pid]


def test_reaped_peer_is_rejected(broker: Any, short_tmp: Path) -> None:
    """Same race without recycling: the peer is simply gone (6.18: pidfd says Pid: -1)."""
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(broker.socket)
                s.sendall(hello_attach("a1b"))
                socket.send_fds(theirs, [b"x"], [s.fileno()])
            finally:
                os._exit(0)
        theirs.close()
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        ours.close()
        os.waitpid(pid, 0)
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    peer = RawPeer.adopt(socket.socket(fileno=fds[0]))
    code, message = error_of(peer.reply())
    peer.close()
    assert code == "permission_denied" and "stale pid" in message
    assert counters(broker.socket).get("attaches", 0) == 0


def test_peer_killed_between_credentials_and_proc_read_is_rejected(
    short_tmp: Path, copied_python: Path
) -> None:
    """The test seam fires after SO_PEERCRED/SO_PEERPIDFD were read: it kills
    the peer, we reap it and give its pid to an allowed program, then the
    broker reads /proc/PID/exe (which now shows the allowed program).  Only
    the pidfd check after the read can tell."""
    if not can_recycle_pids():
        pytest.skip("recycling a pid needs root and a writable /proc/sys/kernel/ns_last_pid")
    to_test_r, to_test_w = os.pipe()
    to_hook_r, to_hook_w = os.pipe()
    attacker_exe = str(copied_python)

    def hook(pid: int) -> None:  # runs inside the broker
        try:
            if os.readlink(f"/proc/{pid}/exe") != attacker_exe:
                return
        except OSError:
            return
        os.kill(pid, signal.SIGKILL)
        os.write(to_test_w, str(pid).encode())
        select.select([to_hook_r], [], [], 30)
        os.read(to_hook_r, 16)

    config = write_config(short_tmp, policy_toml())
    recycled = None
    with inprocess_broker(short_tmp, config, hook=hook) as broker:
        attacker = subprocess.Popen(
            [attacker_exe, "-c", ATTACKER, broker.socket, "-1", hello_attach("a1c").hex(), "yes"],
            env=env_for_copy(),
        )
        try:
            ready, _, _ = select.select([to_test_r], [], [], 30)
            assert ready, "the broker never reached the test seam"
            pid = int(os.read(to_test_r, 16))
            assert pid == attacker.pid
            attacker.wait(10)  # reaped: the pid is free
            recycled = recycle_pid(pid)
        finally:
            os.write(to_hook_w, b"go")
            attacker.kill()
            attacker.wait()
        try:
            assert recycled == pid, "could not recycle the attacker's pid (machine too busy?)"
            status = _wait_rejection(broker, pid)
        finally:
            if recycled:
                reap(recycled)
        assert status["counters"].get("attaches", 0) == 0
        rejected = [e for e in status["security_events"] if e["kind"] == "peer_rejected"]
        assert len(rejected) == 1 and "stale pid" in rejected[0]["detail"], rejected
    for fd in (to_test_r, to_test_w, to_hook_r, to_hook_w):
        os.close(fd)


def _wait_rejection(broker: InProcessBroker, pid: int) -> dict[str, Any]:
    from adversary import wait_until

    def rejected() -> dict[str, Any] | None:
        status = broker.status()
        return status if any(e["pid"] == pid for e in status["security_events"]) else None

    return wait_until(rejected, what=f"the broker to reject pid {pid}")


def test_unexpected_error_during_verification_fails_closed(short_tmp: Path) -> None:
    """A bug (here: the seam raising) must reject the peer, not admit it."""

    def hook(pid: int) -> None:
        if pid != os.getppid() and os.path.exists(f"/proc/{pid}/comm"):
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "adv-bug":
                    raise RuntimeError("simulated bug in verification")

    with inprocess_broker(short_tmp, None, hook=hook) as broker:
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            try:
                with open("/proc/self/comm", "w") as f:
                    f.write("adv-bug")
                peer = RawPeer(broker.socket)
                peer.send(hello_attach("a1d"))
                reply = peer.replies()
                theirs.send(repr(reply).encode())
            finally:
                os._exit(0)
        theirs.close()
        text = ours.recv(4096).decode()
        os.waitpid(pid, 0)
        assert "permission_denied" in text and "RuntimeError" in text, text
        status = broker.status()
        assert status["counters"].get("attaches", 0) == 0
        assert any(e["kind"] == "peer_rejected" for e in status["security_events"])
        assert "simulated bug" in broker.log.read_text()  # logged with its traceback


def test_the_pidfd_names_its_process_until_it_is_reaped_by_either_kernel_interface() -> None:
    """pidfd_pid asks PIDFD_GET_INFO where the kernel has it (6.13+), else
    the fdinfo file: both must say the pid while the process lives or is a
    zombie (its pid cannot be reused yet) and -1 once it is reaped."""
    import time

    from shmbroker._sys import pidfd

    def fdinfo_pid(fd: int) -> int:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pid:"))

    child = os.fork()
    if child == 0:
        time.sleep(30)
        os._exit(0)
    fd = os.pidfd_open(child)
    try:
        assert pidfd.pidfd_pid(fd) == fdinfo_pid(fd) == child
        os.kill(child, signal.SIGKILL)
        os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)  # a zombie now, not reaped
        assert pidfd.pidfd_pid(fd) == fdinfo_pid(fd) == child
        os.waitpid(child, 0)
        assert pidfd.pidfd_pid(fd) == fdinfo_pid(fd) == -1
    finally:
        os.close(fd)
