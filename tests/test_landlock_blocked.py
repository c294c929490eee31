"""Landlock refused by a seccomp filter is not "no Landlock" (issue 15).

Under systemd 252, ``SystemCallFilter=@system-service`` with
``SystemCallErrorNumber=EPERM`` makes landlock_create_ruleset fail with
EPERM, and the broker used to report "this kernel has no Landlock" and serve
unconfined.  Here the same EPERM comes from a real seccomp filter installed
in the broker's process before it execs (seccomp_deny.py), on a kernel that
has Landlock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import BrokerProc
from shmbroker import ShmClient
from shmbroker._sys import landlock

HERE = Path(__file__).resolve().parent
LANDLOCK_SYSCALLS = ",".join(
    str(n) for n in (landlock.SYS_landlock_create_ruleset, landlock.SYS_landlock_add_rule, landlock.SYS_landlock_restrict_self)
)


def _denied(*command: str) -> list[str]:
    return [sys.executable, str(HERE / "seccomp_deny.py"), LANDLOCK_SYSCALLS, "--", *command]


def _serve(tmp: Path, *args: str) -> subprocess.Popen[bytes]:
    sock = tmp / "run" / "broker.sock"
    return subprocess.Popen(
        _denied(sys.executable, "-m", "shmbroker", "serve", "--socket", str(sock), "-v", *args),
        stdout=subprocess.DEVNULL, stderr=open(tmp / "broker.log", "w"),
    )


@pytest.fixture
def blocked_broker(short_tmp: Path) -> Any:
    proc = _serve(short_tmp, "--landlock", "auto")
    broker = BrokerProc(proc=proc, socket=str(short_tmp / "run" / "broker.sock"), log=short_tmp / "broker.log")
    try:
        broker.wait_ready()
        yield broker
    finally:
        proc.terminate()
        proc.wait(10)


def test_auto_warns_that_landlock_is_blocked_and_status_says_so(blocked_broker: Any) -> None:
    log = blocked_broker.log.read_text()
    assert "SECURITY: Landlock is blocked by a seccomp filter" in log, log
    assert "SystemCallFilter=landlock_create_ruleset" in log
    assert "has no Landlock" not in log
    landlock_status = blocked_broker.status()["confinement"]["landlock"]
    assert landlock_status["state"] == "blocked"
    assert landlock_status["mode"] == "auto"
    assert landlock_status["verified"] is False
    assert "EPERM" in landlock_status["reason"]
    # Unconfined, but serving.
    with ShmClient.attach("b", "producer", socket_path=blocked_broker.socket, size=4096) as p:
        p.buf[:2] = b"ok"


def test_on_refuses_to_start_when_landlock_is_blocked(short_tmp: Path) -> None:
    proc = _serve(short_tmp, "--landlock", "on")
    assert proc.wait(15) == 2
    log = (short_tmp / "broker.log").read_text()
    assert "--landlock on: Landlock is blocked by a seccomp filter" in log, log
    assert "Traceback" not in log
    assert not (short_tmp / "run" / "broker.sock").exists()


def test_doctor_fails_landlock_when_blocked_and_sees_it_in_the_running_broker(blocked_broker: Any) -> None:
    out = subprocess.run(
        _denied(sys.executable, "-m", "shmbroker", "doctor", "--json"), capture_output=True, text=True, timeout=60,
    )
    checks = {c["name"]: c for c in json.loads(out.stdout)}
    assert checks["landlock"]["status"] == "fail" and "blocked by a seccomp filter" in checks["landlock"]["detail"]
    assert out.returncode == 2
    # doctor itself unfiltered: the machine has Landlock, the running broker does not.
    out = subprocess.run(
        [sys.executable, "-m", "shmbroker", "doctor", "--json", "--broker", blocked_broker.socket],
        capture_output=True, text=True, timeout=60,
    )
    checks = {c["name"]: c for c in json.loads(out.stdout)}
    assert checks["landlock"]["status"] == "ok"
    assert checks["running broker"]["status"] == "fail"
    assert "Landlock is not in force (blocked)" in checks["running broker"]["consequence"]


def test_control_the_same_broker_without_the_filter_is_landlocked(broker_factory: Any) -> None:
    if landlock.abi_version() <= 0:
        pytest.skip("kernel without Landlock")
    status = broker_factory("--landlock", "auto").status()["confinement"]["landlock"]
    assert status["state"] == "enforced" and status["verified"] is True and status["rules"] >= 4
    assert os.path.realpath(sys.base_prefix) in {os.path.realpath(p) for p in status["paths"]} or any(
        os.path.realpath(p).startswith(os.path.realpath(sys.base_prefix)) for p in status["paths"]
    )
