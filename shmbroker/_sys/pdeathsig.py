"""The parent-death signal (prctl(2) PR_SET_PDEATHSIG).

The kernel sends the signal when the thread that forked us exits, however it
exits (kill -9 included), so a child cannot outlive the process that started
it.  The setting is cleared across fork() but survives execve() of a
non-setuid program.
"""

from __future__ import annotations

import ctypes

from .libc import libc, raise_errno

PR_SET_PDEATHSIG = 1  # linux/prctl.h

_prctl = libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def set_parent_death_signal(signum: int) -> None:
    """Ask the kernel to send ``signum`` to this process when its parent dies.

    There is a window between fork() and this call in which the parent may
    already have died: callers check os.getppid() afterwards.
    """
    if _prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise_errno("prctl(PR_SET_PDEATHSIG)")
