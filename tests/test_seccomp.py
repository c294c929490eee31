"""seccomp: a broker under its own allowlist serves normally, and a syscall
outside the list kills the process (real kernel filters)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shmbroker import ShmClient
from shmbroker._sys import seccomp

pytestmark = pytest.mark.skipif(
    not seccomp.available() or seccomp.audit_arch() is None, reason="no seccomp allowlist for this kernel/architecture"
)
ROOT = Path(__file__).resolve().parent.parent


def _status_field(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith(name + ":"))


@pytest.mark.parametrize("landlock", ["on", "off"])
def test_enforced_broker_serves_the_full_flow(broker_factory: Any, landlock: str) -> None:
    b = broker_factory("--seccomp", "enforce", "--landlock", landlock)
    assert _status_field(b.pid, "Seccomp") == "2"  # SECCOMP_MODE_FILTER
    with open(f"/proc/{b.pid}/task/{b.pid}/children") as f:
        children = [int(x) for x in f.read().split()]
    assert len(children) == (1 if landlock == "on" else 0)  # the exe inspector
    for child in children:
        assert _status_field(child, "Seccomp") == "2"
    for _ in range(2):
        with ShmClient.attach("sc", "producer", socket_path=b.socket, size=65536) as p, \
             ShmClient.attach("sc", "consumer", socket_path=b.socket) as c:
            p.buf[:5] = b"hello"
            assert bytes(c.buf[:5]) == b"hello"
            b.status()
    # Ring channels make the broker create eventfds and pread slots.
    with ShmClient.attach("ring", "producer", socket_path=b.socket, size=65536, ring=True) as p, \
         ShmClient.attach("ring", "consumer", socket_path=b.socket) as c:
        p.send(b"through the ring")
        assert c.recv(timeout=5) == b"through the ring"
    held = ShmClient.attach("panic", "producer", socket_path=b.socket, size=4096)
    b.proc.send_signal(signal.SIGUSR1)
    from conftest import wait_for

    wait_for(lambda: held.revoked, what="panic wipe under seccomp")
    held.close()
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(10) == 0, b.log.read_text()
    assert "seccomp filter installed (enforce" in b.log.read_text()


_FORBIDDEN = """
import os, sys
from shmbroker._broker import sandbox
sandbox.install_seccomp(sys.argv[1])
print("filter on", flush=True)
os.sched_getaffinity(0)   # not in the broker's allowlist
print("survived", flush=True)
"""


@pytest.mark.parametrize("mode", ["enforce", "trap"])
def test_a_syscall_outside_the_list_kills(mode: str) -> None:
    out = subprocess.run([sys.executable, "-c", _FORBIDDEN, mode], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == -signal.SIGSYS, out
    assert "filter on" in out.stdout and "survived" not in out.stdout
    if mode == "trap":
        # faulthandler's async-signal-safe report names where it happened.
        assert 'File "<string>", line 6' in out.stderr, out.stderr


def test_log_mode_allows_and_continues() -> None:
    out = subprocess.run([sys.executable, "-c", _FORBIDDEN, "log"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 0 and "survived" in out.stdout, out


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed (apt-get install strace)")
@pytest.mark.skipif(not Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h").exists(), reason="kernel headers missing")
def test_allowlist_covers_a_fresh_trace() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "seccomp_trace.py"), "--check"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
