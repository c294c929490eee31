"""`shmbroker status` reports the broker's own confinement (issue 15), read
back from the kernel rather than from what the broker was asked to do; the
expected values here come from /proc of the broker, read from outside."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from shmbroker._broker.confinement import CAPABILITY_NAMES, problems
from shmbroker._sys import landlock


def _proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def _caps(mask: str) -> list[str]:
    value = int(mask, 16)
    return [CAPABILITY_NAMES[bit] for bit in range(value.bit_length()) if value >> bit & 1]


def test_status_reports_what_proc_shows_for_the_broker(broker_factory: Any) -> None:
    b = broker_factory()
    confinement = b.status()["confinement"]
    proc = _proc_status(b.pid)
    for key, name in (("CapEff", "effective"), ("CapPrm", "permitted"), ("CapBnd", "bounding"), ("CapAmb", "ambient")):
        assert confinement["capabilities"][name] == _caps(proc[key]), name
    assert confinement["capabilities"]["effective"] == ["CAP_SYS_PTRACE"]
    assert confinement["no_new_privs"] is (proc["NoNewPrivs"] == "1") is True
    assert confinement["seccomp"]["mode"] == int(proc["Seccomp"]) == 0
    assert confinement["seccomp"]["broker_filter"] == "off"
    assert confinement["rlimit_core"] == {"soft": 0, "hard": 0}
    assert confinement["dumpable"] == 0
    assert confinement["user"]["euid"] == int(proc["Uid"].split()[1])
    assert confinement["user"]["name"] == "root"
    if landlock.abi_version() > 0:
        assert confinement["landlock"]["state"] == "enforced"
        assert confinement["landlock"]["abi"] == landlock.abi_version()
        assert confinement["landlock"]["verified"] is True
    assert [text for severity, text in problems(confinement) if severity == "fail"] == []


def test_status_under_the_brokers_own_seccomp_filter(broker_factory: Any) -> None:
    b = broker_factory("--seccomp", "enforce")
    confinement = b.status()["confinement"]  # and the broker survives answering it
    proc = _proc_status(b.pid)
    assert confinement["seccomp"] == {
        "mode": 2, "mode_name": "filter", "filters": int(proc["Seccomp_filters"]), "broker_filter": "enforce",
    }
    assert confinement["dumpable"] == 0
    assert b.proc.poll() is None
    assert not any(severity == "fail" for severity, _ in problems(confinement))


def test_landlock_off_is_reported_as_such(broker_factory: Any) -> None:
    landlock_status = broker_factory("--landlock", "off").status()["confinement"]["landlock"]
    assert landlock_status["state"] == "off" and landlock_status["verified"] is False
    assert "--landlock off" in landlock_status["reason"]


def test_status_text_and_doctor_show_the_confinement(broker_factory: Any) -> None:
    b = broker_factory("--seccomp", "enforce")
    text = subprocess.run(
        [sys.executable, "-m", "shmbroker", "status", "--socket", b.socket], capture_output=True, text=True, timeout=30,
    ).stdout
    assert "confinement:" in text and "caps      effective: CAP_SYS_PTRACE" in text
    assert "the broker's own allowlist: enforce" in text
    out = subprocess.run(
        [sys.executable, "-m", "shmbroker", "doctor", "--json", "--broker", b.socket],
        capture_output=True, text=True, timeout=60,
    )
    check = {c["name"]: c for c in json.loads(out.stdout)}["running broker"]
    # Root is the one thing the shipped unit does differently from this test.
    assert check["status"] == "warn", check
    assert check["consequence"] == "the broker runs as root; the shipped unit runs it as the shmbroker user"


def test_doctor_says_how_to_reach_a_broker_it_cannot_query(short_tmp: Any) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "shmbroker", "doctor", "--json", "--broker", str(short_tmp / "none.sock")],
        capture_output=True, text=True, timeout=60,
    )
    check = {c["name"]: c for c in json.loads(out.stdout)}["running broker"]
    assert check["status"] == "fail" and "no broker is listening" in check["detail"]
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_every_item_the_issue_names_is_reported(broker_factory: Any) -> None:
    assert set(broker_factory().status()["confinement"]) == {
        "user", "landlock", "seccomp", "no_new_privs", "dumpable", "capabilities", "rlimit_core",
    }
