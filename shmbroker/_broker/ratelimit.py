"""Per-key rate limiting in fixed windows, the way journald limits a service's logs.

journald lets each service log ``RateLimitBurst`` messages per
``RateLimitIntervalSec`` and drops the rest, then writes one line saying how
many it dropped.  The broker applies the same shape, keyed by uid, to the
work it does for peers no rule admits and to the log lines they cause: a uid
that keeps connecting only to be refused costs one ``getsockopt`` per
connection once its burst is spent, and one summary line per window.

Sans-IO: the caller passes the time, so tests need no clock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable


@dataclasses.dataclass
class _Window:
    start: float
    used: int = 0
    dropped: int = 0


class RateLimiter:
    """At most ``burst`` events per key in each ``interval`` seconds."""

    def __init__(self, burst: int, interval: float, *, max_keys: int = 4096) -> None:
        self.burst = burst
        self.interval = interval
        # Keys are uids: bounded so a flood of distinct uids (only root can
        # make those) cannot grow the table without end.
        self._max_keys = max_keys
        self._windows: dict[Hashable, _Window] = {}
        self._ended: list[tuple[Hashable, int]] = []  # (key, dropped) of windows replaced early

    def allow(self, key: Hashable, now: float) -> bool:
        """Count one event for ``key``; False once its burst is spent in this window."""
        window = self._window(key, now)
        if window.used < self.burst:
            window.used += 1
            return True
        window.dropped += 1
        return False

    def limited(self, key: Hashable, now: float) -> bool:
        """True while ``key`` has spent its burst in the current window (counts nothing)."""
        window = self._windows.get(key)
        return window is not None and now - window.start < self.interval and window.used >= self.burst

    def note_dropped(self, key: Hashable, now: float) -> None:
        self._window(key, now).dropped += 1

    def expired(self, now: float) -> list[tuple[Hashable, int]]:
        """Forget windows that ended; return (key, dropped) for those that dropped something."""
        done = [(key, w) for key, w in self._windows.items() if now - w.start >= self.interval]
        for key, _ in done:
            del self._windows[key]
        ended, self._ended = self._ended, []
        return ended + [(key, w.dropped) for key, w in done if w.dropped]

    def _window(self, key: Hashable, now: float) -> _Window:
        window = self._windows.get(key)
        if window is None or now - window.start >= self.interval:
            if window is not None and window.dropped:
                self._ended.append((key, window.dropped))
            if window is None and len(self._windows) >= self._max_keys:
                # Evict the oldest window: its key merely gets a fresh burst.
                oldest = min(self._windows, key=lambda k: self._windows[k].start)
                evicted = self._windows.pop(oldest)
                if evicted.dropped:
                    self._ended.append((oldest, evicted.dropped))
            window = self._windows[key] = _Window(start=now)
        return window
