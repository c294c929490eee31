"""Text a peer controls, made safe to print on one line of a log or a terminal.

A peer chooses its executable's file name, which may hold a newline, a
carriage return, ANSI escapes or Unicode line separators: printed raw, one
refusal becomes a second, forged log line in the broker's own format, or
text the terminal hides.  Everything that is not printable is written as a
backslash escape instead (as Python's repr does), so a record stays one line
and every character it carries is visible.
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Characters that make a ``key=value`` value ambiguous unless it is quoted.
_NEEDS_QUOTES = frozenset(' ="\\')


def _escape_char(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(text: str) -> str:
    """``text`` with every non-printable character (C0, DEL, C1, U+2028/2029,
    bidi controls, lone surrogates from undecodable file names...) escaped.

    Backslashes are left alone: this is for prose, where a quoted value
    (:func:`quote`) is unambiguous and anything else needs only to stay on
    its line."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


def quote(text: str) -> str:
    """``text`` as one unambiguous token: as it is when it is printable and
    holds no space, ``=``, ``"`` or backslash; otherwise double-quoted, with
    ``"`` and backslashes escaped as well."""
    if text and text.isprintable() and _NEEDS_QUOTES.isdisjoint(text):
        return text
    out = []
    for ch in text:
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(_escape_char(ch))
    return '"' + "".join(out) + '"'
