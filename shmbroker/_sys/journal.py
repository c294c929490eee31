"""systemd-journald's native protocol (systemd.journal-fields(7),
sd_journal_sendv(3)), without libsystemd: structured log entries.

Text on stderr reaches the journal too, but as one MESSAGE string: an
operator cannot ask ``journalctl SHMBROKER_EVENT=peer_rejected`` for the
refused peers, or filter by their uid.  Native entries carry each field.

One datagram per entry to /run/systemd/journal/socket.  A field is
``NAME=value\\n``, or, when the value holds a newline (a traceback),
``NAME\\n`` + its length as a little-endian 64-bit integer + value + ``\\n``.

The socket is created and connected once, at startup: later sends then need
neither socket(2) nor a path lookup, so they work under the broker's seccomp
allowlist and Landlock sandbox.  Sends never block (the event loop must not
wait on journald); an entry the journal does not take is handed back to the
caller, which writes it to stderr instead.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable

# The address journald listens on (sd_journal_sendv(3), systemd-journald.socket).
JOURNAL_SOCKET = "/run/systemd/journal/socket"
_LENGTH = struct.Struct("<Q")


class JournalUnavailable(OSError):
    """No journald listening here (not under systemd, or it is stopped)."""


def encode(fields: Iterable[tuple[str, str]]) -> bytes:
    """One entry in the native format; names must be [A-Z0-9_], not starting with _."""
    out = bytearray()
    for name, value in fields:
        data = value.encode("utf-8", "replace")
        key = name.encode("ascii")
        if b"\n" in data:
            out += key + b"\n" + _LENGTH.pack(len(data)) + data + b"\n"
        else:
            out += key + b"=" + data + b"\n"
    return bytes(out)


class Journal:
    """A connected datagram socket to journald."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise JournalUnavailable(exc.errno, f"cannot reach the journal at {path}: {exc.strerror}") from None

    def send(self, fields: Iterable[tuple[str, str]]) -> bool:
        """True if the journal took the entry.  False on a full queue, an
        entry too large for one datagram, or journald gone: the caller
        logs it another way."""
        try:
            self.sock.send(encode(fields))
        except OSError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()
