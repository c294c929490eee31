"""Log formatting for the CLI: one line per event, as text or JSON, or
structured entries in systemd's journal."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from ._escape import escape, quote


class TextFormatter(logging.Formatter):
    """One line per record: ``TIME shmbroker[PID] LEVEL: MESSAGE key=value...``.

    Messages and fields carry what peers control (an executable's file
    name): whatever is not printable is escaped, so a peer cannot end the
    line and forge the next one, or hide text from a terminal; a value with
    a space, ``=``, ``"`` or a backslash is double-quoted, so ``key=value``
    parses one way only.  Only an exception's traceback, which the broker
    itself produces, spans more lines.

    ``timestamps=False`` leaves out the time and pid, for journald, which
    records both itself (configure() decides from JOURNAL_STREAM)."""

    def __init__(self, *, timestamps: bool = True) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname.lower()}: {escape(record.getMessage())}"
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={quote(str(v))}" for k, v in fields.items())
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


# MESSAGE_ID of every security event in the journal (generated once, as
# systemd's catalog ids are): `journalctl MESSAGE_ID=...` lists them all.
SECURITY_EVENT_MESSAGE_ID = "4a6ec9db0e314ace80429d8a63e3c0ae"
# syslog(3) priorities, which the journal's PRIORITY field uses.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
# An event's extra fields as journal field names; the pid and uid are the peer's,
# not the broker's own _PID/_UID, which journald adds.
_EVENT_FIELDS = {"pid": "SHMBROKER_PEER_PID", "uid": "SHMBROKER_PEER_UID", "channel": "SHMBROKER_CHANNEL"}


def journal_fields(record: logging.LogRecord, exception: str | None = None) -> list[tuple[str, str]]:
    """One log record as journal fields (systemd.journal-fields(7))."""
    message = record.getMessage() + (f"\n{exception}" if exception else "")
    fields: list[tuple[str, Any]] = [
        ("MESSAGE", message),
        ("PRIORITY", _PRIORITY.get(record.levelno, 6)),
        ("SYSLOG_IDENTIFIER", "shmbroker"),
        ("SHMBROKER_LOGGER", record.name),
        ("CODE_FILE", record.pathname),
        ("CODE_LINE", record.lineno),
        ("CODE_FUNC", record.funcName),
    ]
    event = getattr(record, "event", None)
    if event is not None:
        fields += [("MESSAGE_ID", SECURITY_EVENT_MESSAGE_ID), ("SHMBROKER_EVENT", event)]
        for key, value in (getattr(record, "fields", None) or {}).items():
            fields.append((_EVENT_FIELDS.get(key, "SHMBROKER_" + key.upper()), value))
    # What the record does not know (a peer's channel, makeLogRecord's
    # caller) is left out rather than written as "None".
    return [(name, str(value)) for name, value in fields if value is not None and value != ""]


class JournalHandler(logging.Handler):
    """Structured entries to journald; what it does not take goes to ``fallback``."""

    def __init__(self, journal: Any, fallback: logging.Handler) -> None:
        super().__init__()
        self.journal = journal
        self.fallback = fallback

    def emit(self, record: logging.LogRecord) -> None:
        try:
            exception = self.formatter.formatException(record.exc_info) if record.exc_info and self.formatter else None
            if not self.journal.send(journal_fields(record, exception)):
                self.fallback.handle(record)
        except Exception:
            self.handleError(record)


# Formats `serve --log-format` takes: text (without the time and pid when
# JOURNAL_STREAM says stderr is the journal, which adds both), json, or
# journal (structured entries sent to journald itself).
FORMATS = ("text", "json", "journal")


def configure(fmt: str = "text", level: int = logging.INFO) -> logging.Handler:
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else TextFormatter(timestamps=not os.environ.get("JOURNAL_STREAM"))
    )
    if fmt == "journal":
        from ._sys.journal import Journal, JournalUnavailable

        try:
            journal = Journal()
        except JournalUnavailable as exc:
            handler.handle(logging.makeLogRecord({
                "name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": "--log-format journal: %s; logging text to stderr instead", "args": (exc.strerror,),
            }))
        else:
            journal_handler = JournalHandler(journal, handler)
            journal_handler.setFormatter(TextFormatter(timestamps=False))
            handler = journal_handler
    root = logging.getLogger("shmbroker")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    return handler
