"""A full /dev/shm (issue 12, point 4; docs/attacks.md, A9).

Any local user can fill /dev/shm.  Segments used to be sparse, so a client
touching a page nobody had touched before died of SIGBUS; the wipe then
failed with ENOSPC, an undeclared event kind crashed the broker, and a
panic wipe left the secret readable.  Segments are now reserved up front
(fallocate) and wiped by writing into the reserved pages.

Each scenario runs in a private mount namespace with a 16 MiB tmpfs on
/dev/shm, so the machine's own /dev/shm is never filled.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import start_broker
from helpers import NOBODY, run_in_child
from shmbroker import ShmClient, errors

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts a private tmpfs on /dev/shm")

CLONE_NEWNS = 0x00020000
SHM_SIZE = "16m"
SEGMENT = 4 << 20
SECRET = b"the vault's secret"


def _private_dev_shm() -> None:
    """Give this process (and its children) a small /dev/shm of its own."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SHM_SIZE},mode=1777", "tmpfs", "/dev/shm"], check=True)


def _fill_dev_shm_as_nobody() -> int:
    """Another uid writes /dev/shm full; returns the bytes it got."""

    def fill() -> int:
        written = 0
        with open("/dev/shm/filler", "wb", buffering=0) as f:
            chunk = b"\xaa" * (1 << 16)
            while True:
                try:
                    n = f.write(chunk)
                except OSError:
                    return written
                if not n:
                    return written
                written += n

    return int(run_in_child(fill, uid=NOBODY, gid=NOBODY))


def _producer(socket_path: str, channel: str, go_r: int, ready_w: int, *, secret_at_end: bool) -> None:
    """Attach, touch one page, say ready, wait for go, then write every page and exit without detaching."""
    att = ShmClient.attach(channel, "producer", size=SEGMENT, socket_path=socket_path)
    if secret_at_end:
        att.buf[SEGMENT - len(SECRET):] = SECRET  # the pages in front stay untouched
    else:
        att.buf[:5] = b"first"
    os.write(ready_w, b"r")
    os.read(go_r, 1)
    if not secret_at_end:
        for offset in range(0, SEGMENT, 4096):
            att.buf[offset] = 1  # a page nobody touched before /dev/shm filled up
    os.write(ready_w, b"d")
    os.read(go_r, 1)
    os._exit(0)  # an ordinary exit: no detach frame, the broker sees the hang-up


def _fork_producer(socket_path: str, channel: str, *, secret_at_end: bool) -> tuple[int, int, int]:
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _producer(socket_path, channel, go_r, ready_w, secret_at_end=secret_at_end)
        finally:
            os._exit(1)
    os.close(go_r)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"r"
    return pid, go_w, ready_r


def _exit_status(pid: int, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                return signal.Signals(os.WTERMSIG(status)).name
            return f"exit {os.WEXITSTATUS(status)}"
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hung"


def _scenario() -> dict[str, Any]:
    _private_dev_shm()
    tmp = Path(tempfile.mkdtemp(prefix="shmb-full-", dir="/tmp"))
    broker = start_broker(tmp)
    out: dict[str, Any] = {}
    try:
        early, early_go, early_ready = _fork_producer(broker.socket, "early", secret_at_end=False)
        vault, vault_go, _ = _fork_producer(broker.socket, "vault", secret_at_end=True)
        consumer = ShmClient.attach("vault", "consumer", socket_path=broker.socket)
        assert bytes(consumer.buf[SEGMENT - len(SECRET):]) == SECRET
        out["filled"] = _fill_dev_shm_as_nobody()

        # A newcomer is refused with a reason, not handed a segment it cannot touch.
        try:
            ShmClient.attach("late", "producer", size=SEGMENT, socket_path=broker.socket).close()
            out["late"] = "granted"
        except errors.ShmBrokerError as exc:
            out["late"] = f"{type(exc).__name__}: {exc}"

        # A producer attached before the fill writes every page of its segment.
        os.write(early_go, b"g")
        out["early_wrote_all_pages"] = os.read(early_ready, 1) == b"d"
        os.write(early_go, b"g")
        out["early"] = _exit_status(early)
        time.sleep(0.3)  # the broker handles the hang-up and wipes
        out["broker_alive_after_exit"] = broker.proc.poll() is None

        # The operator's panic wipe, with /dev/shm still full.
        broker.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not consumer.revoked and time.monotonic() < deadline and broker.proc.poll() is None:
            time.sleep(0.02)
        out["consumer_revoked"] = consumer.revoked
        out["secret_after_panic"] = bytes(consumer.buf[SEGMENT - len(SECRET):])
        out["broker_alive_after_panic"] = broker.proc.poll() is None
        if out["broker_alive_after_panic"]:
            status = ShmClient.status(socket_path=broker.socket)
            out["events"] = sorted({e["kind"] for e in status["security_events"]})
        consumer.close()
        os.write(vault_go, b"gg")
        out["vault"] = _exit_status(vault)
    finally:
        if broker.proc.poll() is None:
            broker.proc.send_signal(signal.SIGTERM)
            broker.proc.wait(10)
        out["broker_exit"] = broker.proc.returncode
        out["log"] = broker.log.read_text()[-3000:]
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def test_a_full_dev_shm_kills_no_client_and_never_the_broker() -> None:
    out = run_in_child(_scenario, timeout=120)
    log = out["log"]
    assert out["filled"] > 0
    # Its pages were reserved at attach: filling /dev/shm later cannot take them away.
    assert out["early_wrote_all_pages"] and out["early"] == "exit 0", (out["early"], log)
    assert out["broker_alive_after_exit"], log
    assert out["late"].startswith("LimitExceeded:") and "/dev/shm" in out["late"], out["late"]
    # The panic wipe needs no free space: the secret is gone, the broker serves on.
    assert out["broker_alive_after_panic"], log
    assert out["consumer_revoked"]
    assert out["secret_after_panic"] == bytes(len(SECRET)), out["secret_after_panic"]
    assert "panic_wipe" in out["events"] and "wipe_failed" not in out["events"], out["events"]
    assert out["broker_exit"] == 0, log
    assert "Traceback" not in log, log
