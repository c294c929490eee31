"""Landlock (landlock(7)) through raw syscalls: restrict this process's own
filesystem access to an allowlist of paths.

Landlock is additive-only and inherited: once :func:`restrict_self` ran, this
process and every child it forks later can open files only beneath the
paths given, whatever their uid or capabilities.  It also denies ptrace-mode
access (and so /proc/PID/exe) to every process outside the sandbox: see
shmbroker/_broker/inspector.py for how the broker keeps verifying peers.

The syscall numbers 444-446 are the same on every architecture (they were
allocated after the tables were unified in 5.1).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import stat
from collections.abc import Iterable

from .libc import libc

SYS_landlock_create_ruleset = 444
SYS_landlock_add_rule = 445
SYS_landlock_restrict_self = 446
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1

# include/uapi/linux/landlock.h
ACCESS_FS_EXECUTE = 1 << 0
ACCESS_FS_WRITE_FILE = 1 << 1
ACCESS_FS_READ_FILE = 1 << 2
ACCESS_FS_READ_DIR = 1 << 3
ACCESS_FS_REMOVE_DIR = 1 << 4
ACCESS_FS_REMOVE_FILE = 1 << 5
ACCESS_FS_MAKE_CHAR = 1 << 6
ACCESS_FS_MAKE_DIR = 1 << 7
ACCESS_FS_MAKE_REG = 1 << 8
ACCESS_FS_MAKE_SOCK = 1 << 9
ACCESS_FS_MAKE_FIFO = 1 << 10
ACCESS_FS_MAKE_BLOCK = 1 << 11
ACCESS_FS_MAKE_SYM = 1 << 12
ACCESS_FS_REFER = 1 << 13  # ABI 2
ACCESS_FS_TRUNCATE = 1 << 14  # ABI 3
ACCESS_FS_IOCTL_DEV = 1 << 15  # ABI 5

READ = ACCESS_FS_READ_FILE | ACCESS_FS_READ_DIR
# The rights that mean something for a file rather than a directory.
FILE_RIGHTS = ACCESS_FS_EXECUTE | ACCESS_FS_WRITE_FILE | ACCESS_FS_READ_FILE | ACCESS_FS_TRUNCATE | ACCESS_FS_IOCTL_DEV
READ_EXEC = READ | ACCESS_FS_EXECUTE
# Everything a directory of our own needs: create, remove, rewrite files.
READ_WRITE = (
    READ | ACCESS_FS_WRITE_FILE | ACCESS_FS_REMOVE_FILE | ACCESS_FS_MAKE_REG | ACCESS_FS_MAKE_SOCK
    | ACCESS_FS_REMOVE_DIR | ACCESS_FS_MAKE_DIR | ACCESS_FS_TRUNCATE
)

_ABI_FS = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
_ABI_ATTR_SIZE = {1: 8, 2: 8, 3: 8, 4: 16, 5: 16}  # handled_access_fs [, handled_access_net [, scoped]]

_syscall = libc.syscall
_syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the uapi header
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class LandlockUnavailable(Exception):
    """The kernel has no Landlock, it is disabled at boot (lsm=), or a
    seccomp filter blocks it."""


# Why Landlock cannot be used, from the errno of the version query.  Only
# these mean "this kernel has no Landlock" (landlock_create_ruleset(2)):
# ENOSYS when it is not built in, EOPNOTSUPP when it is built in but not in
# the lsm= list.  EPERM is something else altogether: the kernel has it, but
# a seccomp filter in front of the process refuses the call, as systemd's
# SystemCallFilter= does with SystemCallErrorNumber=EPERM for syscalls its
# sets do not list (systemd 252's @system-service has no landlock_*).
ABSENT, DISABLED, BLOCKED, FAILED = "absent", "disabled", "blocked", "failed"
_STATE_OF_ERRNO = {errno.ENOSYS: ABSENT, errno.EOPNOTSUPP: DISABLED, errno.EPERM: BLOCKED}


@dataclasses.dataclass(frozen=True)
class Support:
    """What the version query said: the ABI, or why there is none."""

    abi: int  # 0 when Landlock cannot be used
    errno: int = 0  # of the failed query; 0 when abi > 0

    @property
    def available(self) -> bool:
        return self.abi > 0

    @property
    def state(self) -> str:
        """``"available"``, ``"absent"``, ``"disabled"``, ``"blocked"`` or ``"failed"``."""
        return "available" if self.abi > 0 else _STATE_OF_ERRNO.get(self.errno, FAILED)

    @property
    def blocked(self) -> bool:
        return self.state == BLOCKED

    def reason(self) -> str:
        """Why there is no Landlock, in words an operator can act on ("" when there is)."""
        state = self.state
        if state == "available":
            return ""
        if state == ABSENT:
            return "this kernel has no Landlock (ENOSYS: needs Linux 5.13+ built with CONFIG_SECURITY_LANDLOCK)"
        if state == DISABLED:
            return "Landlock is built into this kernel but not enabled (EOPNOTSUPP: add landlock to the lsm= boot parameter)"
        if state == BLOCKED:
            return (
                "Landlock is blocked by a seccomp filter in front of this process (EPERM from "
                "landlock_create_ruleset); under systemd, allow it with "
                "SystemCallFilter=landlock_create_ruleset landlock_add_rule landlock_restrict_self"
            )
        return f"the Landlock version query failed: {os.strerror(self.errno)} (errno {self.errno})"


def probe() -> Support:
    """Ask the kernel for its Landlock ABI, keeping the errno that says why not."""
    result = _syscall(ctypes.c_long(SYS_landlock_create_ruleset), None, ctypes.c_size_t(0), ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    if result < 0:
        return Support(0, ctypes.get_errno())
    return Support(int(result))


def abi_version() -> int:
    """The Landlock ABI version, or 0 when it cannot be used (see :func:`probe` for why)."""
    return probe().abi


@dataclasses.dataclass(frozen=True)
class Applied:
    """What :func:`apply` put in force: the ABI and the rules the kernel took."""

    abi: int
    rules: tuple[tuple[str, int], ...]  # (path, access actually granted)
    missing: tuple[str, ...]  # paths skipped because they do not exist


def restrict_self(rules: Iterable[tuple[str, int]]) -> int:
    """Allow only ``rules`` (path, access mask) from now on; return the ABI used."""
    return apply(rules).abi


def apply(rules: Iterable[tuple[str, int]]) -> Applied:
    """Allow only ``rules`` (path, access mask) from now on; say what was applied.

    Paths that do not exist are skipped (a missing optional directory is not
    a reason to refuse the start).  Rights the running ABI does not know are
    masked off, which is the graceful degradation landlock(7) recommends.
    A rule may name a file (a zipapp's archive, a config file): it then
    gets only the rights that apply to files.
    """
    support = probe()
    if not support.available:
        raise LandlockUnavailable(support.reason())
    abi = support.abi
    handled = _ABI_FS.get(abi, _ABI_FS[5])
    attr = _RulesetAttr(handled_access_fs=handled)
    size = _ABI_ATTR_SIZE.get(abi, 16)
    ruleset = _syscall(ctypes.c_long(SYS_landlock_create_ruleset), ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock_create_ruleset: {os.strerror(err)}")
    granted: list[tuple[str, int]] = []
    missing: list[str] = []
    try:
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                missing.append(path)
                continue
            try:
                # fstat of the fd we pass, not a second lookup of the path.
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    # Directory-only rights on a file are EINVAL.
                    access &= FILE_RIGHTS
                beneath = _PathBeneathAttr(allowed_access=access & handled, parent_fd=fd)
                if _syscall(ctypes.c_long(SYS_landlock_add_rule), ctypes.c_int(ruleset), ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(beneath), ctypes.c_uint32(0)) < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"landlock_add_rule({path}): {os.strerror(err)}")
                granted.append((path, access & handled))
            finally:
                os.close(fd)
        if _syscall(ctypes.c_long(SYS_landlock_restrict_self), ctypes.c_int(ruleset), ctypes.c_uint32(0)) < 0:
            err = ctypes.get_errno()
            hint = " (needs PR_SET_NO_NEW_PRIVS or CAP_SYS_ADMIN)" if err == errno.EPERM else ""
            raise OSError(err, f"landlock_restrict_self: {os.strerror(err)}{hint}")
    finally:
        os.close(ruleset)
    return Applied(abi, tuple(granted), tuple(missing))
