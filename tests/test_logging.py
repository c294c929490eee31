"""Logs an operator can use: JSON keys a pipeline can filter on, fatal errors
in the format asked for, and no doubled timestamps under journald."""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from conftest import wait_for
from shmbroker._logging import TextFormatter


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


# -- what peers control stays on its line -----------------------------------
FORGED = "py\n2026-12-05T02:12:20.000Z shmbroker[1] info: attached pid 1 uid 0\x1b[2K\r\u2028\x85\x7f"


def _record(msg: str, fields: dict[str, object] | None = None, exc_info: object = None) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "shmbroker.test", "levelno": logging.WARNING, "levelname": "WARNING",
                                    "msg": "%s", "args": (msg,), "exc_info": exc_info})
    if fields is not None:
        record.fields = fields  # type: ignore[attr-defined]
    return record


# `key=value` or `key="..."` with backslash escapes, as the text formatter writes them.
FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]+)(?= |$)')


def test_text_log_fields_with_spaces_equals_and_quotes_parse_one_way() -> None:
    fields = {
        "exe": '/opt/my app/run=1 "x" \\y', "channel": "frames", "empty": "", "uid": 3002,
        "forged": FORGED + " uid=0", "surrogate": "py\udcff",
    }
    line = TextFormatter(timestamps=False).format(_record("security event request_refused: no", fields))
    assert "\n" not in line and all(ch.isprintable() for ch in line), line
    message, _, rest = line.partition(" exe=")
    assert message == "warning: security event request_refused: no"
    parsed = {key: ast.literal_eval(value) if value.startswith('"') else value for key, value in FIELD.findall("exe=" + rest)}
    assert parsed == {key: str(value) for key, value in fields.items()}
    assert FIELD.sub("", "exe=" + rest).strip() == "", "text left over that is no field"
    assert 'channel=frames' in line and "uid=3002" in line, "plain values are written as they are"


def test_text_log_message_stays_one_line_but_a_traceback_is_kept() -> None:
    formatter = TextFormatter()
    line = formatter.format(_record(f"attached exe {FORGED}"))
    assert "\n" not in line and all(ch.isprintable() for ch in line), line
    assert "exe py\\n2026-12-05T02:12:20.000Z" in line and "\\x1b[2K\\r\\u2028\\x85\\x7f" in line
    try:
        raise ValueError("boom")
    except ValueError:
        text = formatter.format(_record("failed", exc_info=sys.exc_info()))
    first, *traceback = text.split("\n")
    assert first.endswith("warning: failed") and traceback[0] == "Traceback (most recent call last):"
    assert traceback[-1] == "ValueError: boom"


def test_json_and_journal_entries_keep_a_forged_line_inside_its_value() -> None:
    from shmbroker._logging import JsonFormatter, journal_fields
    from shmbroker._sys.journal import encode

    record = _record(f"exe {FORGED}", {"exe": FORGED, "uid": 3002})
    record.event = "request_refused"  # type: ignore[attr-defined]
    line = JsonFormatter().format(record)
    assert "\n" not in line and line.isascii() and line.isprintable()
    assert json.loads(line)["exe"] == FORGED
    entry = encode(journal_fields(record))
    # A value holding a newline is sent with its length, never as NAME=value lines.
    assert b"\nSHMBROKER_EXE\n" in entry and b"SHMBROKER_EXE=" not in entry
    assert entry.count(b"\n2026-12-05T02:12:20.000Z") == 2  # inside MESSAGE and SHMBROKER_EXE, nowhere else
