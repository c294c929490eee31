"""The protocol's vocabulary, declared once: roles, error codes, security
event kinds.  The broker, the client and `status` all speak these.  Roles
are a Literal type, which the public API (``shmbroker.Role``) shows as the
two strings a caller passes; error codes and event kinds are ``str`` enums,
whose members compare equal to (and serialize as) their wire strings."""

from __future__ import annotations

import enum
from typing import Literal, get_args

Role = Literal["producer", "consumer"]
# An alias has no docstring of its own; help(shmbroker.Role) shows this one.
Role.__doc__ = """How a peer attaches to a channel: ``"producer"`` or ``"consumer"``.

A producer writes (and, passing ``size=``, may create the channel); a
consumer reads through a read-only mapping.  A typo such as ``"consumr"``
is a type error for mypy, and a ValueError at run time."""

# Every valid role, in the order messages list them; the one place they are spelled.
ROLES: tuple[Role, ...] = get_args(Role)


class ErrorCode(str, enum.Enum):
    """What an ``error`` reply says went wrong; each maps to one exception
    class (``shmbroker.errors``, attribute ``code``)."""

    PROTOCOL = "protocol"  # malformed or out-of-order message; the connection closes
    PERMISSION_DENIED = "permission_denied"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"  # the channel exists with other parameters, or is taken in that role
    LIMIT = "limit"
    TIMEOUT = "timeout"
    REVOKED = "revoked"  # the segment was revoked before the request could be answered
    INTERNAL = "internal"  # a bug in the broker; its log says more


class EventKind(str, enum.Enum):
    """Every kind of security event `status` reports and the log records."""

    PEER_REJECTED = "peer_rejected"
    REQUEST_REFUSED = "request_refused"  # a verified peer's request or connection refused
    LEASE_BROKEN = "lease_broken"
    IDENTITY_CHANGED = "identity_changed"
    PANIC_WIPE = "panic_wipe"
    SEGMENT_TRUNCATED = "segment_truncated"
    WIPE_FAILED = "wipe_failed"
    # A uid kept being refused past its burst; later refusals of that uid are
    # counted, not logged one by one (_broker/ratelimit.py).
    REFUSALS_SUPPRESSED = "refusals_suppressed"
