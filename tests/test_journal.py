"""Structured journal entries (`serve --log-format journal`), checked against
a datagram socket standing in for journald; `make test-systemd` checks the
same fields in a real journal."""

from __future__ import annotations

import logging
import socket
import struct
from pathlib import Path

import pytest

from shmbroker._logging import SECURITY_EVENT_MESSAGE_ID, JournalHandler, TextFormatter
from shmbroker._sys.journal import Journal, JournalUnavailable, encode


def decode(data: bytes) -> dict[str, str]:
    """The native protocol, as journald reads it (journald-native.c)."""
    fields: dict[str, str] = {}
    while data:
        line, sep, rest = data.partition(b"\n")
        assert sep, "every field ends with a newline"
        if b"=" in line:
            key, _, value = line.partition(b"=")
            data = rest
        else:
            key = line
            (length,) = struct.unpack_from("<Q", rest)
            value = rest[8:8 + length]
            assert rest[8 + length:9 + length] == b"\n"
            data = rest[9 + length:]
        fields[key.decode()] = value.decode()
    return fields


@pytest.fixture
def journald(short_tmp: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(short_tmp / "journal.sock"))
    sock.settimeout(5)
    return sock


def test_multiline_values_use_the_length_prefixed_form() -> None:
    fields = decode(encode([("MESSAGE", "line one\nline two"), ("PRIORITY", "3")]))
    assert fields == {"MESSAGE": "line one\nline two", "PRIORITY": "3"}
    assert b"MESSAGE=" not in encode([("MESSAGE", "a\nb")])


def test_a_security_event_carries_its_fields(journald: socket.socket, short_tmp: Path) -> None:
    handler = JournalHandler(Journal(str(short_tmp / "journal.sock")), logging.NullHandler())
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("shmbroker.test_journal")
    logger.addHandler(handler)
    try:
        logger.warning("security event %s: %s", "peer_rejected", "uid 1001 refused",
                       extra={"event": "peer_rejected", "fields": {"pid": 42, "uid": 1001, "channel": None}})
    finally:
        logger.removeHandler(handler)
    fields = decode(journald.recv(65536))
    assert fields["MESSAGE"] == "security event peer_rejected: uid 1001 refused"
    assert fields["PRIORITY"] == "4" and fields["SYSLOG_IDENTIFIER"] == "shmbroker"
    assert fields["MESSAGE_ID"] == SECURITY_EVENT_MESSAGE_ID
    assert fields["SHMBROKER_EVENT"] == "peer_rejected"
    assert fields["SHMBROKER_PEER_PID"] == "42" and fields["SHMBROKER_PEER_UID"] == "1001"
    assert "SHMBROKER_CHANNEL" not in fields  # None is left out, not written as "None"
    assert fields["CODE_FILE"] == __file__ and fields["CODE_FUNC"] == "test_a_security_event_carries_its_fields"


def test_an_entry_the_journal_does_not_take_goes_to_the_fallback(short_tmp: Path) -> None:
    path = short_tmp / "gone.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        journal = Journal(str(path))
    # journald went away after we connected: the entry must not be lost.
    seen: list[str] = []

    class Fallback(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = JournalHandler(journal, Fallback())
    handler.setFormatter(TextFormatter())
    handler.handle(logging.makeLogRecord({"msg": "still logged", "levelno": logging.INFO, "levelname": "INFO"}))
    assert seen == ["still logged"]


def test_no_journal_is_a_clear_error(short_tmp: Path) -> None:
    with pytest.raises(JournalUnavailable) as missing:
        Journal(str(short_tmp / "absent.sock"))
    assert "cannot reach the journal" in str(missing.value.strerror)
