"""Log formatting for the CLI: one line per event, as text or JSON."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any


class TextFormatter(logging.Formatter):
    """One line per record: ``TIME shmbroker[PID] LEVEL: MESSAGE key=value...``.

    ``timestamps=False`` leaves out the time and pid, for journald, which
    records both itself (configure() decides from JOURNAL_STREAM)."""

    def __init__(self, *, timestamps: bool = True) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname.lower()}: {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        if self.timestamps:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            line = f"{stamp}.{int(record.msecs):03d}Z shmbroker[{record.process}] {line}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record; a security event's fields (pid, uid, gid,
    exe, channel, role, rule) are keys of their own, for log pipelines to
    filter on without parsing the message."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": record.created,
            "level": record.levelname.lower(),
            "process": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if event is not None:
            entry["event"] = event
        for key, value in (getattr(record, "fields", None) or {}).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# Formats `serve --log-format` takes; "journal" is text without the time and
# pid journald adds itself, and "text" becomes it under journald.
FORMATS = ("text", "json", "journal")


def configure(fmt: str = "text", level: int = logging.INFO) -> logging.Handler:
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        under_journald = fmt == "journal" or bool(os.environ.get("JOURNAL_STREAM"))
        formatter = TextFormatter(timestamps=not under_journald)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger("shmbroker")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    return handler
