"""The broker's Landlock sandbox: which paths it keeps after startup, and why.

Applied once the listener is open and before the first client is served.
From then on the broker (and anything it forks later) can open files only
beneath these paths:

* its socket directory: the socket is unlinked there at shutdown;
* /dev/shm: shm_open(O_CREAT|O_EXCL) + shm_unlink + ftruncate of segments;
* its config file, read-only;
* Python's import paths, read-only: modules imported lazily after startup
  (tracebacks, encodings) must still load;
* /proc, read-only: /proc/self/fdinfo to check pidfds.  Note that Landlock
  also denies ptrace-mode access to processes outside the sandbox, so
  /proc/PID/exe of clients is checked by the exe inspector (inspector.py),
  forked before restricting.

Everything else, /etc, /home, /root, /var included, is out of reach: a bug
that lets a client steer a path in the broker cannot read or plant files.
"""

from __future__ import annotations

import logging
import os
import sys

from .._sys import landlock

log = logging.getLogger(__name__)


def rules(*, socket_path: str, config_path: str | None) -> list[tuple[str, int]]:
    allowed: list[tuple[str, int]] = [
        (os.path.dirname(os.path.abspath(socket_path)), landlock.READ_WRITE),
        ("/dev/shm", landlock.READ_WRITE),
        ("/proc", landlock.READ),
    ]
    if config_path:
        allowed.append((os.path.abspath(config_path), landlock.READ))
    seen: set[str] = set()
    for entry in [*sys.path, sys.prefix, sys.base_prefix, sys.exec_prefix]:
        path = os.path.abspath(entry or os.curdir)
        if path not in seen and os.path.exists(path):
            seen.add(path)
            allowed.append((path, landlock.READ))
    return allowed


def restrict(*, socket_path: str, config_path: str | None) -> int:
    """Apply the sandbox; return the Landlock ABI it used."""
    allowed = rules(socket_path=socket_path, config_path=config_path)
    abi = landlock.restrict_self(allowed)
    log.info("landlock ABI %d: filesystem restricted to %s", abi, ", ".join(p for p, _ in allowed))
    return abi
