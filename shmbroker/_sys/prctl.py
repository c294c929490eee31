"""prctl(2) and capability syscalls through ctypes, for when python-prctl is absent.

Only the handful of options the hardening code, the exe inspector and the
benchmark workers use; numbers from
include/uapi/linux/prctl.h and linux/capability.h.
"""

from __future__ import annotations

import ctypes

from .libc import libc, raise_errno

PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

CAP_CHOWN = 0
CAP_SETPCAP = 8
CAP_SYS_PTRACE = 19
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_prctl = libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_capget = libc.capget
_capget.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData * 2)]
_capget.restype = ctypes.c_int
_capset = libc.capset
_capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData * 2)]
_capset.restype = ctypes.c_int


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    result: int = _prctl(option, arg2, arg3, arg4, arg5)
    if result < 0:
        raise_errno(f"prctl({option})")
    return result


def set_parent_death_signal(signum: int) -> None:
    """Ask the kernel to send ``signum`` to this process when the thread that
    forked it exits, however it exits (kill -9 included).

    There is a window between fork() and this call in which the parent may
    already have died: callers check os.getppid() afterwards.
    """
    prctl(PR_SET_PDEATHSIG, signum)


def last_cap() -> int:
    """Highest capability this kernel knows.  Probed with PR_CAPBSET_READ, not
    read from /proc/sys/kernel/cap_last_cap, which systemd's ProcSubset=pid hides."""
    cap = 0
    while True:
        if _prctl(PR_CAPBSET_READ, cap + 1, 0, 0, 0) < 0:
            return cap
        cap += 1


def get_caps() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) as 64-bit masks of this process."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _capget(ctypes.byref(header), ctypes.byref(data)) < 0:
        raise_errno("capget")
    effective, permitted, inheritable = (
        int(getattr(data[0], f) | (getattr(data[1], f) << 32)) for f in ("effective", "permitted", "inheritable")
    )
    return effective, permitted, inheritable


def set_caps(effective: int, permitted: int, inheritable: int) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    if _capset(ctypes.byref(header), ctypes.byref(data)) < 0:
        raise_errno("capset")
