"""Process hardening of a real broker, checked through /proc and ptrace."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import NOBODY, fork_broker, run_in_child, stop_forked as _stop
from shmbroker import hardening
# Everything `serve` imports lazily, loaded now: the forked broker runs as
# nobody, who cannot read the interpreter's stdlib under /root.
import shmbroker._broker.driver  # noqa: F401,E402
import shmbroker._broker.config  # noqa: F401,E402
import shmbroker._logging  # noqa: F401,E402
import shmbroker._paths  # noqa: F401,E402
from shmbroker._sys import prctl as sysprctl

PTRACE_SEIZE = 0x4206  # like PTRACE_ATTACH (same permission check) but sends no SIGSTOP
_libc = ctypes.CDLL(None, use_errno=True)


def _proc_field(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    raise KeyError(name)


def _core_limit(pid: int) -> tuple[str, str]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max core file size"):
                soft, hard = line.split()[4:6]
                return soft, hard
    raise KeyError("core")


def test_broker_core_limit_is_zero_and_caps_are_minimal(broker: Any) -> None:
    assert _core_limit(broker.pid) == ("0", "0")
    assert _proc_field(broker.pid, "NoNewPrivs") == "1"
    only_ptrace = f"{1 << sysprctl.CAP_SYS_PTRACE:016x}"
    assert _proc_field(broker.pid, "CapEff") == only_ptrace
    assert _proc_field(broker.pid, "CapPrm") == only_ptrace
    assert _proc_field(broker.pid, "CapBnd") == only_ptrace
    assert int(_proc_field(broker.pid, "CapInh"), 16) == 0
    assert int(_proc_field(broker.pid, "CapAmb"), 16) == 0


def test_disable_env_turns_hardening_off_with_a_warning(broker_factory: Any) -> None:
    b = broker_factory(env={hardening.DISABLE_ENV: "1"})
    assert _proc_field(b.pid, "NoNewPrivs") == "0"
    assert "hardening is OFF" in b.log.read_text()


def _forked_broker(tmp: Path, *, disable: bool) -> tuple[int, Path]:
    """A broker running as nobody, forked from this already-imported interpreter."""
    home = tmp / ("nb-off" if disable else "nb")
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    sock = home / "run" / "broker.sock"
    log = tmp / (home.name + ".log")

    def become() -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        # setuid() alone makes a process non-dumpable; undo that so the
        # test measures what harden_process() does, not the uid change.
        sysprctl.prctl(sysprctl.PR_SET_DUMPABLE, 1)
        if disable:
            os.environ[hardening.DISABLE_ENV] = "1"
        else:
            os.environ.pop(hardening.DISABLE_ENV, None)

    return fork_broker(["serve", "--socket", str(sock)], log, become=become, started=sock.exists), log


def _seize_errno(pid: int) -> int:
    def attempt() -> int:
        if _libc.ptrace(PTRACE_SEIZE, pid, None, None) == 0:
            return 0  # our exit detaches again; SEIZE never stopped the broker
        return ctypes.get_errno()

    return run_in_child(attempt, uid=NOBODY, gid=NOBODY)


@pytest.fixture
def nobody_broker(short_tmp: Path) -> Iterator[Any]:
    started: list[int] = []

    def start(disable: bool = False) -> int:
        pid, _ = _forked_broker(short_tmp, disable=disable)
        started.append(pid)
        return pid

    yield start
    for pid in started:
        _stop(pid)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the broker as another uid")
def test_nonroot_broker_is_not_dumpable_nor_ptraceable(nobody_broker: Any) -> None:
    pid = nobody_broker()
    # Non-dumpable: the kernel hands /proc/PID/* to root, so the broker's own
    # uid can no longer read its memory, environment or fds.
    assert os.stat(f"/proc/{pid}/status").st_uid == 0
    assert os.stat(f"/proc/{pid}/mem").st_uid == 0
    assert _core_limit(pid) == ("0", "0")
    assert _seize_errno(pid) == errno.EPERM


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the broker as another uid")
def test_control_unhardened_nonroot_broker_is_ptraceable(nobody_broker: Any) -> None:
    """The same setup with hardening off: proves the test above can fail."""
    pid = nobody_broker(disable=True)
    assert os.stat(f"/proc/{pid}/status").st_uid == NOBODY
    assert _seize_errno(pid) == 0


def test_harden_process_is_idempotent_in_a_child() -> None:
    def twice() -> tuple[list[str], list[str], int, int]:
        first = hardening.harden_process(drop_capabilities=False)
        second = hardening.harden_process(drop_capabilities=False)
        return first.applied, second.applied, sysprctl.prctl(sysprctl.PR_GET_DUMPABLE), sysprctl.prctl(sysprctl.PR_GET_NO_NEW_PRIVS)

    first, second, dumpable, nnp = run_in_child(twice)
    assert first == second == ["RLIMIT_CORE=0", "PR_SET_DUMPABLE=0", "PR_SET_NO_NEW_PRIVS"]
    assert (dumpable, nnp) == (0, 1)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the broker as another uid")
def test_hardened_client_needs_a_broker_with_cap_sys_ptrace(nobody_broker: Any, short_tmp: Path) -> None:
    """A non-dumpable client hides /proc/PID/exe: a broker without
    CAP_SYS_PTRACE (here: running as nobody) must reject it, and says why."""
    from shmbroker import ShmClient, errors

    nobody_broker()
    sock = str(short_tmp / "nb" / "run" / "broker.sock")

    def attach(harden: bool) -> str:
        # setuid() left us non-dumpable; a normal process is dumpable.
        sysprctl.prctl(sysprctl.PR_SET_DUMPABLE, 1)
        try:
            with ShmClient.attach("h", "producer", socket_path=sock, size=4096, harden=harden):
                return "attached"
        except errors.PermissionDenied as exc:
            return str(exc)

    assert run_in_child(lambda: attach(False), uid=NOBODY, gid=NOBODY) == "attached"
    refused = run_in_child(lambda: attach(True), uid=NOBODY, gid=NOBODY)
    assert "non-dumpable" in refused and "CAP_SYS_PTRACE" in refused


def test_hardened_client_is_verified_by_a_broker_with_cap_sys_ptrace(broker: Any) -> None:
    from shmbroker import ShmClient

    def attach() -> int:
        with ShmClient.attach("h", "producer", socket_path=broker.socket, size=4096, harden=True) as att:
            att.buf[:2] = b"ok"
            return sysprctl.prctl(sysprctl.PR_GET_DUMPABLE)

    assert run_in_child(attach) == 0
