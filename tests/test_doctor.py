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

EXPECTED = {"leases", "SO_PEERPIDFD", "landlock", "memfd seals", "mlock limit", "ptrace restrictions", "core dumps", "seccomp", "ring core"}


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
    last = out.stdout.splitlines()[-1]
    assert last.startswith("summary: ") and last.endswith(f"exit status {out.returncode}"), last


def test_doctor_summary_says_what_its_exit_status_means() -> None:
    ok = _doctor.Check("leases", _doctor.OK, "fine")
    warn = _doctor.Check("ptrace restrictions", _doctor.WARN, "Yama absent", "same-uid ptrace")
    fail = _doctor.Check("SO_PEERPIDFD", _doctor.FAIL, "none", "peers cannot be verified")
    assert _doctor.summary([ok, ok]) == "summary: all 2 checks OK; exit status 0"
    assert _doctor.summary([ok, warn]) == (
        "summary: 1 OK, 1 warning (ptrace restrictions): the broker runs here with reduced protection "
        "(the -> lines say what is lost); exit status 1"
    )
    assert _doctor.summary([ok, warn, fail]) == (
        "summary: 1 OK, 1 warning (ptrace restrictions), 1 missing essential (SO_PEERPIDFD): the broker cannot "
        "run securely here until that is fixed; exit status 2"
    )
    helptext = subprocess.run([sys.executable, "-m", "shmbroker", "doctor", "--help"], capture_output=True, text=True, timeout=60)
    assert "0 every check OK; 1 warnings" in " ".join(helptext.stdout.split())
    assert "2 missing essentials" in " ".join(helptext.stdout.split())


def test_doctor_warns_about_a_small_mlock_limit_without_cap_ipc_lock() -> None:
    def probe() -> Any:
        eff, prm, inh = sysprctl.get_caps()
        sysprctl.set_caps(eff & ~(1 << 14), prm & ~(1 << 14), inh)
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (65536, 65536))
        return _doctor.check_mlock()

    check = run_in_child(probe)
    assert check.status == "warn" and "64 KiB" in check.consequence


def test_doctor_reports_the_ring_core_and_the_python_fallback(monkeypatch: Any) -> None:
    from shmbroker._ring import native

    assert _doctor.check_ring_core().status == "ok"  # `make test` builds the extension
    monkeypatch.setattr(native, "_native_override", False)
    fallback = _doctor.check_ring_core()
    assert fallback.status == "warn" and "pure-Python fallback" in fallback.detail
    # Simulates another CPU (platform.machine() is not asked): what doctor
    # says on aarch64 without the extension.
    monkeypatch.setattr(native, "_machine_override", "aarch64")
    refused = _doctor.check_ring_core()
    assert refused.status == "fail" and "aarch64" in refused.detail and "refused" in refused.consequence
