"""`shmbroker doctor` against the real kernel of this machine."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from typing import Any

from helpers import run_in_child
from shmbroker import _doctor
from shmbroker._sys import landlock
from shmbroker._sys import prctl as sysprctl

EXPECTED = {"leases", "SO_PEERPIDFD", "landlock", "memfd seals", "mlock limit", "ptrace restrictions", "core dumps", "seccomp"}


def test_doctor_json_reports_every_check_and_a_matching_exit_code() -> None:
    out = subprocess.run([sys.executable, "-m", "shmbroker", "doctor", "--json"], capture_output=True, text=True, timeout=60)
    checks = json.loads(out.stdout)
    assert {c["name"] for c in checks} == EXPECTED
    worst = max({"ok": 0, "warn": 1, "fail": 2}[c["status"]] for c in checks)
    assert out.returncode == worst
    for c in checks:
        assert c["status"] == "ok" or c["consequence"], f"{c['name']} is degraded without saying what that means"
    by_name = {c["name"]: c for c in checks}
    if landlock.abi_version() > 0:
        assert by_name["landlock"]["status"] == "ok" and f"ABI {landlock.abi_version()}" in by_name["landlock"]["detail"]


def test_doctor_text_output_names_consequences() -> None:
    out = subprocess.run([sys.executable, "-m", "shmbroker", "doctor"], capture_output=True, text=True, timeout=60)
    assert "leases" in out.stdout and "Traceback" not in out.stderr
    assert out.returncode in (0, 1, 2)


def test_doctor_warns_about_a_small_mlock_limit_without_cap_ipc_lock() -> None:
    def probe() -> Any:
        eff, prm, inh = sysprctl.get_caps()
        sysprctl.set_caps(eff & ~(1 << 14), prm & ~(1 << 14), inh)
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (65536, 65536))
        return _doctor.check_mlock()

    check = run_in_child(probe)
    assert check.status == "warn" and "64 KiB" in check.consequence
