"""Security events and counters, kept for `shmbroker status` and logged once each."""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

# Status shows recent events; older ones live in the log.  Bounded so a
# flood of rejected connections cannot grow the broker's memory.
MAX_KEPT_EVENTS = 256

EVENT_KINDS = ("peer_rejected", "lease_broken", "identity_changed", "panic_wipe", "segment_truncated")


@dataclasses.dataclass(frozen=True)
class SecurityEvent:
    kind: str
    time: float
    pid: int | None
    uid: int | None
    detail: str
    channel: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class EventLog:
    def __init__(self) -> None:
        self.events: collections.deque[SecurityEvent] = collections.deque(maxlen=MAX_KEPT_EVENTS)
        self.counters: collections.Counter[str] = collections.Counter()

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def record(
        self, kind: str, detail: str, *, pid: int | None = None, uid: int | None = None, channel: str | None = None
    ) -> SecurityEvent:
        assert kind in EVENT_KINDS, kind
        event = SecurityEvent(kind=kind, time=time.time(), pid=pid, uid=uid, detail=detail, channel=channel)
        self.events.append(event)
        self.counters[kind] += 1
        log.warning(
            "security event %s: %s", kind, detail,
            extra={"event": kind, "fields": {"pid": pid, "uid": uid, "channel": channel}},
        )
        return event
