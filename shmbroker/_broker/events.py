"""Security events and counters, kept for `shmbroker status` and logged once each."""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Any

from .._wire.vocabulary import EventKind

__all__ = ["EventKind", "EventLog", "SecurityEvent", "Who"]

log = logging.getLogger(__name__)

# Status shows recent events; older ones live in the log.  Bounded so a
# flood of rejected connections cannot grow the broker's memory.
MAX_KEPT_EVENTS = 256


@dataclasses.dataclass(frozen=True)
class Who:
    """The structured fields of an event about a peer, as far as they are known."""

    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    exe: str | None = None  # for humans: identity is (st_dev, st_ino)
    channel: str | None = None
    role: str | None = None
    rule: int | None = None  # index of the policy rule that decided, where one did


@dataclasses.dataclass(frozen=True)
class SecurityEvent:
    kind: EventKind
    time: float
    pid: int | None
    uid: int | None
    detail: str
    channel: str | None = None
    gid: int | None = None
    exe: str | None = None
    role: str | None = None
    rule: int | None = None

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["kind"] = self.kind.value if isinstance(self.kind, EventKind) else str(self.kind)
        return out


# Kinds a peer causes (so a peer can cause many of them): the broker
# rate-limits them per uid.  A truncation is one: only a peer holding the
# segment's read-write fd can shrink it, and it can do so again on every
# fresh generation.  The others (a lease broken, a segment not wiped, a
# panic) are kept apart, so no flood of a peer's events can push them out of
# `status`.
PEER_KINDS = frozenset({
    EventKind.PEER_REJECTED, EventKind.REQUEST_REFUSED, EventKind.IDENTITY_CHANGED, EventKind.REFUSALS_SUPPRESSED,
    EventKind.SEGMENT_TRUNCATED,
})


class EventLog:
    def __init__(self) -> None:
        self._peer_events: collections.deque[SecurityEvent] = collections.deque(maxlen=MAX_KEPT_EVENTS)
        self._segment_events: collections.deque[SecurityEvent] = collections.deque(maxlen=MAX_KEPT_EVENTS)
        self.counters: collections.Counter[str] = collections.Counter()

    @property
    def events(self) -> list[SecurityEvent]:
        """The kept events of both kinds, oldest first."""
        return sorted((*self._peer_events, *self._segment_events), key=lambda e: e.time)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def record(
        self, kind: EventKind, detail: str, *, pid: int | None = None, uid: int | None = None,
        channel: str | None = None, who: Who | None = None,
    ) -> SecurityEvent:
        who = who or Who()
        who = dataclasses.replace(
            who, pid=who.pid if pid is None else pid, uid=who.uid if uid is None else uid,
            channel=who.channel if channel is None else channel,
        )
        fields = dataclasses.asdict(who)
        name = kind.value if isinstance(kind, EventKind) else str(kind)
        if not isinstance(kind, EventKind):
            # Only a bug gets here (the type says EventKind).  Bookkeeping
            # must never take the broker down: keep the event and say so.
            log.error("undeclared security event kind %r", name)
        event = SecurityEvent(
            kind=kind, time=time.time(), detail=detail, pid=who.pid, uid=who.uid, channel=who.channel,
            gid=who.gid, exe=who.exe, role=who.role, rule=who.rule,
        )
        (self._peer_events if kind in PEER_KINDS else self._segment_events).append(event)
        self.counters[name] += 1
        log.warning(
            "security event %s: %s", name, detail,
            extra={"event": name, "fields": {k: v for k, v in fields.items() if v is not None}},
        )
        return event
