"""Keeping secrets out of swap and core dumps: mlock(2) and madvise(MADV_DONTDUMP).

Locking is best effort by design: a process whose RLIMIT_MEMLOCK is too small
still gets its segment, but we warn loudly (once per process) because its
pages may then reach swap.  The soft limit is raised to the hard limit first,
the way gpg-agent and the dead-man's-switch daemons prepare their buffers.
"""

from __future__ import annotations

import ctypes
import logging
import resource

from .libc import libc

log = logging.getLogger(__name__)

MADV_DONTDUMP = 16  # asm-generic/mman-common.h

_mlock = libc.mlock
_mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_mlock.restype = ctypes.c_int
# mlock2(MLOCK_ONFAULT) (Linux 4.4, glibc 2.27) locks each page as it is first
# touched instead of faulting the whole segment in at attach: plain mlock made
# attaching a 1 MiB segment ~150 us slower, and a consumer that reads a small
# part of a large segment would pin all of it.  Pages are never swapped once
# resident either way, which is the property we need.
MLOCK_ONFAULT = 1
_mlock2 = getattr(libc, "mlock2", None)
if _mlock2 is not None:
    _mlock2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _mlock2.restype = ctypes.c_int
_madvise = libc.madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise.restype = ctypes.c_int

_limit_raised = False
_warned = False


def raise_memlock_limit() -> tuple[int, int]:
    """Raise RLIMIT_MEMLOCK's soft limit to its hard limit; return the result."""
    global _limit_raised
    if _limit_raised:
        return resource.getrlimit(resource.RLIMIT_MEMLOCK)
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    _limit_raised = True
    return soft, hard


def protect(address: int, length: int) -> bool:
    """Exclude the range from core dumps and lock it in RAM; True if locked."""
    global _warned
    # DONTDUMP first: it never fails for a valid range, and matters even
    # when locking is refused.
    if _madvise(address, length, MADV_DONTDUMP) != 0:
        err = ctypes.get_errno()
        log.warning("madvise(MADV_DONTDUMP) failed (errno %d): this mapping may appear in core dumps", err)
    raise_memlock_limit()
    if _mlock2 is not None and _mlock2(address, length, MLOCK_ONFAULT) == 0:
        return True
    if _mlock(address, length) == 0:
        return True
    if not _warned:
        _warned = True
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        shown = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft // 1024} KiB"
        log.warning(
            "SECURITY: could not mlock a %d KiB shared segment (errno %d, RLIMIT_MEMLOCK %s): its contents may be "
            "written to swap.  Raise the limit (ulimit -l, LimitMEMLOCK= in systemd, or CAP_IPC_LOCK).  "
            "Continuing unlocked; this warning is shown once.",
            length // 1024, ctypes.get_errno(), shown,
        )
    return False
