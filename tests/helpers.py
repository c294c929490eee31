"""Helpers for tests that need real processes."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shmbroker import ShmClient

NOBODY = 65534


def shm_leftovers() -> set[str]:
    """shmbroker's objects visible in /dev/shm (other tools' files are ignored)."""
    return {name for name in os.listdir("/dev/shm") if name.startswith("shmbroker")}


def lasting_shm_objects(before: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """shmbroker's objects in /dev/shm beyond ``before`` that stay there.

    A broker unlinks each segment right after creating it, so another
    broker on the machine (another test run, another session) makes names
    that live for microseconds; a leak is one still there half a second on."""
    new = shm_leftovers() - set(before)
    if new:
        time.sleep(0.5)
        new &= shm_leftovers()
    return new


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> list[str]:
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return targets


@dataclasses.dataclass
class BrokerProc:
    proc: subprocess.Popen[bytes]
    socket: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}:\n{self.log.read_text()}")
            if os.path.exists(self.socket):
                try:
                    self.status()
                    return
                except Exception:
                    pass
            time.sleep(0.02)
        raise RuntimeError(f"broker not ready after {timeout}s:\n{self.log.read_text()}")

    def status(self) -> dict[str, Any]:
        return ShmClient.status(socket_path=self.socket)

    def fd_count(self) -> int:
        return fd_count(self.pid)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.status()["security_events"] if e["kind"] == kind]

    def segment_fds(self, expect: int | None = None, timeout: float = 2.0) -> list[int]:
        """The broker's fds of segments.  With ``expect``, wait up to
        ``timeout`` for that many and return what is there then: the broker
        closes its copy of a reply's fd just after sendmsg(2) returns, which
        can be after the client has already received it and moved on."""
        deadline = time.monotonic() + timeout
        while True:
            fds = []
            for fd in os.listdir(f"/proc/{self.pid}/fd"):
                try:
                    if "/dev/shm/shmbroker-" in os.readlink(f"/proc/{self.pid}/fd/{fd}"):
                        fds.append(int(fd))
                except FileNotFoundError:
                    pass
            if expect is None or len(fds) == expect or time.monotonic() >= deadline:
                return fds
            time.sleep(0.01)


class ChildError(Exception):
    """An exception raised in a forked child, re-raised in the parent."""

    def __init__(self, type_name: str, message: str, tb: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.tb = tb


def run_in_child(fn: Callable[[], Any], *, uid: int | None = None, gid: int | None = None, timeout: float = 30) -> Any:
    """Run ``fn`` in a forked child (after dropping to uid/gid) and return its result.

    Forking keeps every module already imported, so the child needs no access
    to the interpreter's files after dropping privileges.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            if gid is not None:
                os.setgroups([])
                os.setgid(gid)
            if uid is not None:
                os.setuid(uid)
            result: Any = ("ok", fn())
        except BaseException as exc:
            result = ("err", type(exc).__name__, str(exc), traceback.format_exc())
        try:
            data = pickle.dumps(result)
        except Exception as exc:
            data = pickle.dumps(("err", "PicklingError", str(exc), ""))
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        deadline = time.monotonic() + timeout
        data = f.read()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise TimeoutError("child did not exit")
        time.sleep(0.01)
    if not data:
        raise ChildError("Died", f"child exited with status {status} without a result", "")
    result = pickle.loads(data)
    if result[0] == "err":
        raise ChildError(*result[1:])
    return result[1]


def fork_broker(args: list[str], log: Path, *, become: Callable[[], None], started: Callable[[], bool]) -> int:
    """`shmbroker ARGS` in a forked child that first runs ``become`` (drop to
    another uid, set its environment), its stderr in ``log``; returns its pid
    once ``started()`` says so.

    Forked, not exec'ed: the interpreter under /root is out of reach of
    other uids, and the fork keeps every module already imported."""
    import signal
    import sys

    import pytest

    from shmbroker import cli

    logfd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o644)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(logfd, 2)
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # not pytest's capture
            become()
            code = cli.main(args)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(logfd)
    deadline = time.monotonic() + 15
    while not started():
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done or time.monotonic() > deadline:
            if not done:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            pytest.fail(f"broker did not start:\n{log.read_text()}")
        time.sleep(0.02)
    return pid


def stop_forked(pid: int) -> None:
    """SIGTERM a forked broker and reap it; SIGKILL after 10 s."""
    import signal

    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def mapping_permissions(address: int) -> str:
    """The rwxp/s column of our own /proc/self/maps line that starts at ``address``."""
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            if int(span.split("-")[0], 16) == address:
                return perms
    raise AssertionError(f"no mapping starts at {address:#x}")
