"""The command line as a user meets it: real processes, exit codes, messages."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import BrokerProc, lasting_shm_objects
from shmbroker import ShmClient, cli


def shmbroker(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmbroker", *args], capture_output=True, text=True, timeout=timeout)


def test_help_describes_every_command() -> None:
    top = shmbroker("--help")
    assert top.returncode == 0
    expected = {"serve": "--socket", "status": "--socket", "check-config": "FILE", "doctor": "--json", "bench": "--quick"}
    for command, option in expected.items():
        assert command in top.stdout
        sub = shmbroker(command, "--help")
        assert sub.returncode == 0
        assert option in sub.stdout


def test_second_broker_on_a_live_socket_is_refused(broker: BrokerProc) -> None:
    proc = shmbroker("serve", "--socket", broker.socket)
    assert proc.returncode == 1
    assert f"pid {broker.pid}" in proc.stderr
    # One line saying why, and nothing a broker that started would log
    # (hardening, shutdown, "every segment was wiped").
    assert proc.stderr.startswith("shmbroker: a broker is already running on") and proc.stderr.count("\n") == 1, proc.stderr
    broker.status()  # the first broker is untouched


def test_a_socket_directory_others_may_use_is_refused_before_anything_is_logged(short_tmp: Path) -> None:
    shared = short_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    proc = shmbroker("serve", "--socket", str(shared / "broker.sock"))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"shmbroker: socket directory {shared} already exists with mode 0755")
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_stale_socket_of_a_killed_broker_is_replaced(broker_factory: Any) -> None:
    first = broker_factory()
    att = ShmClient.attach("frames", "producer", socket_path=first.socket, size=4096)
    att.buf[:4] = b"kept"
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    assert os.path.exists(first.socket), "kill -9 cannot remove the socket; the next broker must cope"
    assert lasting_shm_objects() == set(), "segments are unlinked at birth, so even kill -9 leaves nothing"
    # The client keeps its mapping after the broker died.
    assert bytes(att.buf[:4]) == b"kept"
    second = broker_factory()
    assert second.socket == first.socket
    with ShmClient.attach("frames", "producer", socket_path=second.socket, size=4096) as fresh:
        assert bytes(fresh.buf[:4]) == bytes(4)
    att.close()


def test_status_without_a_broker_says_what_to_do(short_tmp: Path) -> None:
    proc = shmbroker("status", "--socket", str(short_tmp / "none.sock"))
    assert proc.returncode == 1
    assert "no broker is listening" in proc.stderr and "shmbroker serve" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_status_json_and_text(broker: BrokerProc) -> None:
    with ShmClient.attach("frames", "producer", socket_path=broker.socket, size=4096):
        raw = shmbroker("status", "--socket", broker.socket, "--json")
        text = shmbroker("status", "--socket", broker.socket)
    assert raw.returncode == 0 and text.returncode == 0
    status = json.loads(raw.stdout)
    assert list(status)[0] == "schema" and status["schema"] == 1, "scripts check the schema first"
    assert status["broker"]["pid"] == broker.pid
    assert [c["name"] for c in status["channels"]] == ["frames"]
    assert "frames" in text.stdout and "producer" in text.stdout
    assert re.search(r"  up \d+s\n", text.stdout), text.stdout


@pytest.mark.parametrize(
    "seconds, shown",
    [(0, "0s"), (59.9, "59s"), (61, "1m 1s"), (3 * 3600 + 12 * 60 + 5, "3h 12m"), (2 * 86400 + 3 * 3600 + 59, "2d 3h")],
)
def test_uptime_reads_as_a_duration(seconds: float, shown: str) -> None:
    assert cli._fmt_duration(seconds) == shown


def test_bad_channel_argument_is_a_usage_error(short_tmp: Path) -> None:
    proc = shmbroker("serve", "--socket", str(short_tmp / "s" / "b.sock"), "--channel", "frames")
    assert proc.returncode == 2
    assert "NAME:SIZE" in proc.stderr or "frames" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_channel_option_declares_a_ring_channel(broker_factory: Any) -> None:
    b = broker_factory("--channel", "events:1MiB:ring")
    with ShmClient.attach("events", "consumer", socket_path=b.socket) as cons, \
            ShmClient.attach("events", "producer", socket_path=b.socket) as prod:
        prod.send(b"declared on the command line")
        assert cons.recv(timeout=5) == b"declared on the command line"
        text = shmbroker("status", "--socket", b.socket)
    assert text.returncode == 0
    assert "events" in text.stdout and "ring, messages up to" in text.stdout
    status = b.status()
    assert status["channels"][0]["ring"] is True
