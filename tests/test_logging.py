"""Logs an operator can use: JSON keys a pipeline can filter on, fatal errors
in the format asked for, and no doubled timestamps under journald."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import wait_for


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmbroker", "serve", *args], capture_output=True, text=True, timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_a_fatal_error_is_json_when_the_logs_are(tmp_path: Path) -> None:
    proc = _serve("--config", str(tmp_path / "missing.toml"), "--log-format", "json")
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    entry = json.loads(line)
    assert entry["level"] == "critical" and entry["error"] == "ConfigError" and "missing.toml" in entry["message"]


def test_under_journald_lines_carry_no_time_of_their_own(short_tmp: Path) -> None:
    """journald stamps every line itself: JOURNAL_STREAM set means stderr is
    the journal, and a second timestamp would only be noise."""
    log = short_tmp / "broker.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shmbroker", "serve", "--socket", str(short_tmp / "run" / "b.sock")],
            stderr=err, env={**os.environ, "JOURNAL_STREAM": "8:1234"},
        )
    try:
        wait_for(lambda: "listening on" in log.read_text(), what="the broker")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    lines = log.read_text().splitlines()
    assert lines and all(line.startswith(("info: ", "warning: ")) for line in lines), lines
