"""Typed protocol messages and their strict msgpack encoding.

Each frame body is one msgpack map with a ``type`` key.  Decoding is strict:
unknown types, unknown or missing keys, wrong value types (``True`` is not an
int), over-long strings and malformed channel names are protocol errors, so
the broker's logic only ever sees well-formed values.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import msgpack

from ..errors import ProtocolError
from .vocabulary import ROLES, ErrorCode, Role

PROTOCOL_NAME = "shmbroker"
PROTOCOL_VERSION = 1
# Same spirit as D-Bus name rules: short, printable, no path separators, so a
# name is safe in logs, file names and status output.
CHANNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_TEXT = 4096
_UINT64_MAX = 2**64 - 1


def valid_channel_name(name: str) -> bool:
    return CHANNEL_NAME.fullmatch(name) is not None


@dataclasses.dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str]


# Requests: client -> broker.
@dataclasses.dataclass(frozen=True)
class Hello(Message):
    TYPE: ClassVar[str] = "hello"
    version: int = PROTOCOL_VERSION
    protocol: str = PROTOCOL_NAME


@dataclasses.dataclass(frozen=True)
class Attach(Message):
    TYPE: ClassVar[str] = "attach"
    channel: str
    role: Role
    size: int | None = None
    # Ring channels (issue 3).  Optional fields are left out of the frame
    # while they hold their default, so brokers that predate them still
    # accept every request that does not use them.
    ring: bool = False
    max_message: int | None = None
    # Seconds the broker may hold the request until the channel exists (and,
    # for a ring consumer, has a producer) instead of refusing it at once.
    wait: float | None = None


# The longest a request may wait (a day): a bound, not a policy.
MAX_WAIT = 86400.0


@dataclasses.dataclass(frozen=True)
class Detach(Message):
    TYPE: ClassVar[str] = "detach"


@dataclasses.dataclass(frozen=True)
class StatusRequest(Message):
    TYPE: ClassVar[str] = "status"


@dataclasses.dataclass(frozen=True)
class Cursors(Message):
    """A ring producer asks for its consumers' cursor pages (answered with CursorPages)."""

    TYPE: ClassVar[str] = "cursors"


# Replies: broker -> client.
@dataclasses.dataclass(frozen=True)
class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    version: int
    broker_pid: int


@dataclasses.dataclass(frozen=True)
class Attached(Message):
    """Sent with the fds named in ``fds``, in that order, as SCM_RIGHTS."""

    TYPE: ClassVar[str] = "attached"
    channel: str
    role: Role
    size: int
    generation: int
    layout: int
    fds: tuple[str, ...]
    ring: bool = False
    slot: int | None = None  # a ring consumer's slot
    # A ring consumer's first read index (also written into its cursor
    # page).  The consumer trusts this copy: it came over the authenticated
    # socket, with no shared page in between.
    start: int | None = None


@dataclasses.dataclass(frozen=True)
class Detached(Message):
    TYPE: ClassVar[str] = "detached"


@dataclasses.dataclass(frozen=True)
class CursorPages(Message):
    """Sent with one fd per entry of ``slots``, in that order, as SCM_RIGHTS:
    the cursor page of the consumer attached in that slot under that serial."""

    TYPE: ClassVar[str] = "cursor_pages"
    slots: tuple[int, ...]
    serials: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class StatusReply(Message):
    TYPE: ClassVar[str] = "status_reply"
    status: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Error(Message):
    """A refusal; ``code`` is an ErrorCode value and maps to an exception class (errors.for_code)."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str


ERROR_CODES = tuple(code.value for code in ErrorCode)

REQUESTS: dict[str, type[Message]] = {m.TYPE: m for m in (Hello, Attach, Detach, StatusRequest, Cursors)}
REPLIES: dict[str, type[Message]] = {
    m.TYPE: m for m in (Welcome, Attached, Detached, StatusReply, CursorPages, Error)
}
# A reply names at most this many fds: a ring producer's attach (segment,
# two pages, nine eventfds) and a reply with every consumer's cursor page
# (eight) fit, far below the kernel's SCM_MAX_FD (limits.py).
MAX_FDS = 16
_LIST_FIELDS = ("fds", "slots", "serials")


def _uint(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _UINT64_MAX


def _text(value: Any) -> bool:
    return type(value) is str and len(value) <= _MAX_TEXT


_Check = Callable[[Any], bool]
# Per message type: field -> (check, required).
_SCHEMA: dict[type[Message], dict[str, tuple[_Check, bool]]] = {
    Hello: {"version": (_uint, True), "protocol": (lambda v: v == PROTOCOL_NAME, True)},
    Attach: {
        "channel": (lambda v: type(v) is str and valid_channel_name(v), True),
        "role": (lambda v: v in ROLES, True),
        "size": (lambda v: v is None or (_uint(v) and v > 0), False),
        "ring": (lambda v: type(v) is bool, False),
        "max_message": (lambda v: v is None or (_uint(v) and v > 0), False),
        "wait": (lambda v: v is None or (type(v) in (int, float) and 0 <= v <= MAX_WAIT), False),
    },
    Detach: {},
    StatusRequest: {},
    Welcome: {"version": (_uint, True), "broker_pid": (_uint, True)},
    Attached: {
        "channel": (lambda v: type(v) is str and valid_channel_name(v), True),
        "role": (lambda v: v in ROLES, True),
        "size": (_uint, True),
        "generation": (_uint, True),
        "layout": (_uint, True),
        "fds": (lambda v: type(v) is list and len(v) <= MAX_FDS and all(_text(k) for k in v), True),
        "ring": (lambda v: type(v) is bool, False),
        "slot": (lambda v: v is None or (_uint(v) and v < 64), False),
        "start": (lambda v: v is None or (_uint(v) and v < 2**62), False),
    },
    Detached: {},
    Cursors: {},
    CursorPages: {
        "slots": (lambda v: type(v) is list and len(v) <= MAX_FDS and all(_uint(k) and k < 64 for k in v), True),
        "serials": (lambda v: type(v) is list and len(v) <= MAX_FDS and all(_uint(k) for k in v), True),
    },
    StatusReply: {"status": (lambda v: type(v) is dict, True)},
    Error: {"code": (lambda v: v in ERROR_CODES, True), "message": (_text, True)},
}


def encode(message: Message) -> bytes:
    body: dict[str, Any] = {"type": message.TYPE}
    schema = _SCHEMA[type(message)]
    for field in dataclasses.fields(message):
        value = getattr(message, field.name)
        if not schema[field.name][1] and value is field.default:
            continue  # optional and at its default: omitted (see Attach)
        body[field.name] = list(value) if isinstance(value, tuple) else value
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def decode(body: bytes, allowed: Mapping[str, type[Message]]) -> Message:
    """Parse one frame body into a message of one of the ``allowed`` types."""
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise ProtocolError(f"frame is not valid msgpack ({type(exc).__name__})") from None
    if type(raw) is not dict:
        raise ProtocolError("frame is not a msgpack map")
    kind = raw.pop("type", None)
    cls = allowed.get(kind) if type(kind) is str else None
    if cls is None:
        raise ProtocolError(f"unexpected message type {str(kind)[:40]!r}")
    schema = _SCHEMA[cls]
    unknown = set(raw) - set(schema)
    if unknown:
        raise ProtocolError(f"{kind}: unknown field {str(sorted(map(str, unknown))[0])[:40]!r}")
    for name, (check, required) in schema.items():
        if name not in raw:
            if required:
                raise ProtocolError(f"{kind}: missing field {name!r}")
            continue
        if not check(raw[name]):
            raise ProtocolError(f"{kind}: invalid value for {name!r}")
    for name in _LIST_FIELDS:
        if name in raw:
            raw[name] = tuple(raw[name])
    return cls(**raw)
