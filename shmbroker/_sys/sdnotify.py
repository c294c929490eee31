"""systemd's notify protocol (sd_notify(3)), without libsystemd.

One datagram per state change to $NOTIFY_SOCKET (a path, or an abstract
name written with a leading '@').  The watchdog interval comes from
$WATCHDOG_USEC, honoured only when $WATCHDOG_PID is unset or names us, as
sd_watchdog_enabled(3) specifies.  The broker's event loop calls
:meth:`Notifier.tick` itself: a watchdog ping sent from a helper thread would
keep arriving while the loop is stuck, which defeats the watchdog.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)

# sd_watchdog_enabled(3): "it is recommended that a daemon sends a keep-alive
# notification message to the service manager every half of the time
# returned here".
WATCHDOG_FRACTION = 0.5


class Notifier:
    """Talks to the service manager, or does nothing when not run by one."""

    def __init__(self, address: str | None, watchdog_usec: int | None) -> None:
        self.address = address
        self.interval = watchdog_usec * WATCHDOG_FRACTION / 1e6 if watchdog_usec else None
        self.next_ping = time.monotonic() + self.interval if self.interval else None
        # Created now, at startup, so that sending later needs no socket()
        # call under the seccomp allowlist.
        self._sock: socket.socket | None = None
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)

    @classmethod
    def from_env(cls) -> Notifier:
        address = os.environ.get("NOTIFY_SOCKET") or None
        if address is not None and not (address.startswith("/") or address.startswith("@")):
            log.warning("ignoring NOTIFY_SOCKET=%r: only AF_UNIX paths and @abstract names are supported", address)
            address = None
        usec: int | None = None
        raw_usec, raw_pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
        if raw_usec and (not raw_pid or raw_pid == str(os.getpid())):
            try:
                usec = int(raw_usec)
            except ValueError:
                log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", raw_usec)
            else:
                if usec <= 0:
                    usec = None
        # Our own children (the exe inspector, say) must not impersonate us.
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, state: str) -> None:
        if self.address is None or self._sock is None:
            return
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            self._sock.sendto(state.encode(), target)
        except OSError as exc:
            # Never fatal: a missing manager must not take the broker down,
            # but a lost watchdog ping will, so say why.
            log.warning("could not notify the service manager (%s): %s", state.split("\n")[0], exc.strerror)

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def seconds_until_ping(self, now: float) -> float | None:
        return None if self.next_ping is None else max(self.next_ping - now, 0.0)

    def tick(self, now: float) -> None:
        if self.next_ping is not None and now >= self.next_ping:
            self.notify("WATCHDOG=1")
            assert self.interval is not None
            self.next_ping = now + self.interval

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
