"""Every limit the broker enforces, with its default and the precedent it follows.

All of them can be overridden in the ``[limits]`` table of the config file;
:func:`Limits.from_mapping` refuses unknown keys and out-of-range values so a
typo never silently leaves a limit at its default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# The kernel's SCM_MAX_FD: the most fds one sendmsg() can carry.  Receivers
# size their control buffer for this many so a hostile sender can never make
# the kernel truncate (MSG_CTRUNC) silently; dbus-broker does the same.
SCM_MAX_FD = 253

# Layout of a segment: one header page in front of the payload, so the
# payload is page aligned (numpy, O_DIRECT, and future per-page protections).
PAGE_SIZE = 4096


# What max_fds_per_uid allows for by default.  A connection: its socket and
# pidfd, a ring consumer's cursor page, and one unread reply's fds (a ring
# producer's attach carries 12, but few connections hold one at once).  A
# channel created on demand: its segment (two fds for a memfd) and a ring's
# control, index and read-only index pages and nine eventfds.
FDS_PER_CONNECTION = 4
FDS_PER_SEGMENT = 14
# Limits where 0 means "derived from the others" (see the field's comment).
_DERIVED_WHEN_ZERO = frozenset({"max_fds_per_uid"})


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one broker.  Field comments cite the precedent."""

    # Control frames are tiny msgpack maps; OpenSSH caps a packet at 256 KiB
    # and dbus-daemon a message at 32 MiB.  Nothing we exchange comes close to
    # 64 KiB, so anything bigger is an attack or a bug.
    max_frame_size: int = 64 * KiB
    # dbus-daemon auth_timeout is 30 s; systemd's varlink uses 45 s.  A client
    # must finish hello + first request within this.
    handshake_timeout: float = 30.0
    # dbus-daemon max_incomplete_connections = 64 (CVE-2014-3639 showed why).
    max_incomplete_connections: int = 64
    # dbus-daemon system bus: 256 connections per user; the dbus-broker
    # launcher uses 64.  We take dbus-daemon's figure because every attachment
    # is its own connection here.
    max_connections_per_uid: int = 256
    # dbus-daemon system bus: 2048 connections in total.
    max_connections: int = 2048
    # Segments (channels) one uid may create on demand.  dbus-broker caps
    # per-user objects at 64 (the launcher's connection quota); same order.
    max_segments_per_uid: int = 64
    # Largest single segment.  Not a precedent from a broker: a sanity bound
    # well above camera frames and model shards, below an accidental 2**40.
    max_segment_size: int = 1 * GiB
    # Total bytes of segments one uid may own, a quota in the spirit of
    # dbus-broker's per-user byte accounting (8 MiB outgoing per connection
    # there; segments are our unit of memory, so the quota is larger).
    max_bytes_per_uid: int = 4 * GiB
    # Requests in flight per connection before we stop reading from it, so one
    # client pipelining requests cannot grow the broker's buffers.
    max_pending_frames: int = 16
    # The broker's file descriptors one uid may pin: its sockets and pidfds,
    # the segment and ring fds of channels it created, its ring consumers'
    # cursor pages, and the fds of replies it has not read yet (in flight,
    # which the kernel charges to the broker's user).  In the spirit of
    # dbus-broker's per-user quotas.  0 (the default) derives it from the two
    # caps it must fit: FDS_PER_CONNECTION for each of max_connections_per_uid
    # and FDS_PER_SEGMENT for each of max_segments_per_uid (1,920 with the
    # defaults), so raising either raises it too, while a handful of uids
    # still cannot exhaust RLIMIT_NOFILE between them.
    max_fds_per_uid: int = 0
    # Refusals of one uid that are answered, logged and recorded per window;
    # after that its connections are closed unanswered (only uids no rule
    # names) and counted, with one summary event per window.  journald's
    # RateLimitIntervalSec=30s is the model for the window.
    refusals_per_uid_burst: int = 16
    refusal_window: float = 30.0
    # Attach requests of one uid the broker holds (attach(wait=...)) until
    # their channel exists.  Like dbus-daemon's max_replies_per_connection
    # (pending calls a connection may have), a bound on what a peer can make
    # the broker remember for it.
    max_waiting_per_uid: int = 64

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{field.name} must be a number, not {value!r}")
            if value <= 0 and not (field.name in _DERIVED_WHEN_ZERO and value == 0):
                raise ValueError(f"{field.name} must be positive, not {value!r}")
            if field.type in ("int", int) and not isinstance(value, int):
                raise ValueError(f"{field.name} must be a whole number, not {value!r}")
        if self.max_segment_size < PAGE_SIZE:
            raise ValueError(f"max_segment_size must be at least {PAGE_SIZE} bytes")

    @property
    def fds_per_uid(self) -> int:
        """max_fds_per_uid, or what it derives to when left at 0."""
        if self.max_fds_per_uid:
            return self.max_fds_per_uid
        return FDS_PER_CONNECTION * self.max_connections_per_uid + FDS_PER_SEGMENT * self.max_segments_per_uid

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Limits:
        """Build limits from a config table; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown limit {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**dict(values))


DEFAULT_LIMITS = Limits()
