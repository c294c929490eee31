"""The SIGBUS guard: sigaction(SIGBUS) and the table of guarded mappings.

The handler itself is C (shmbroker/_guard.c), because it must run inside a
fault that Python cannot see: on a SIGBUS inside a guarded mapping it maps
private zero pages over the mapping and sets the segment's revoked word, so
the faulting access completes and the library reports a revoked channel.
Faults anywhere else go to the handler that was there before, or kill the
process as they would have without us.

Limits (docs/attacks.md, A6): a SIGBUS handler installed after ours
(``signal.signal``, ``faulthandler.enable()``, a C library) replaces it.
A Python-level handler cannot repair a fault, so the faulting thread then
re-runs the faulting instruction forever; ``faulthandler`` reports the fault
and the process dies as before.  :func:`install` puts ours back when SIGBUS
was reset to SIG_DFL or SIG_IGN, and otherwise warns once.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

_guard: ModuleType | None = None


def _extension() -> ModuleType:
    """The C extension, loaded at first use rather than at import: the
    broker never maps a segment and so never needs it, which lets
    ``shmbroker serve`` run from a plain zipapp (an archive can hold no
    extension module).  Clients need it at their first attach."""
    global _guard
    if _guard is None:
        try:
            from .. import _guard as extension
        except ImportError as exc:  # a broken install, or a zipapp
            raise ImportError(
                "shmbroker's C extension shmbroker._guard is missing or does not load "
                f"({exc}); reinstall shmbroker with pip on a machine with gcc and the Python headers "
                "(apt-get install gcc python3-dev); a zipapp cannot hold it, so run clients from an "
                "installed copy (the broker itself runs from a zipapp)"
            ) from exc
        _guard = extension
    return _guard


def __getattr__(name: str) -> Any:
    # TableFull and SLOTS come from the extension; PEP 562 keeps them lazy.
    if name in ("TableFull", "SLOTS"):
        return getattr(_extension(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_warned = False


def install() -> bool:
    """Make the guard the process's SIGBUS handler if we may; True if it is.

    Cheap enough to call before every guarded mapping (one sigaction(2) call)."""
    global _warned
    if _extension().install():
        return True
    if not _warned:
        _warned = True
        log.warning(
            "SECURITY: another SIGBUS handler replaced shmbroker's (signal.signal or faulthandler.enable() "
            "after the first attach?); a peer that truncates a posix segment can now crash this process.  "
            "Reset SIGBUS to SIG_DFL (or enable faulthandler before attaching) to restore the guard.  "
            "This warning is shown once."
        )
    return False


def active() -> bool:
    """True if the guard is the process's SIGBUS handler now."""
    return bool(_extension().active())


def watch(address: int, length: int, revoked_offset: int, writable: bool) -> int:
    """Guard a MAP_SHARED range; return its token.  Installs the handler first."""
    install()
    return int(_extension().register(address, length, revoked_offset, writable))


def unwatch(token: int) -> bool:
    """Stop guarding; True if a fault replaced the range.  A token already
    unwatched is fine: tokens are never reused, so it cannot name another range."""
    try:
        return bool(_extension().unregister(token))
    except ValueError:
        return False


def faulted(token: int) -> bool:
    """True if a fault replaced the range with zero pages."""
    return bool(_extension().faulted(token))
