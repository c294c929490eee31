"""seccomp-bpf allowlists through prctl(2), with a classic BPF program built here.

The program (seccomp(2) "Pitfalls"): check seccomp_data.arch first, since a
syscall number means something else under another ABI; refuse the x32 range
on x86-64 (nr >= 0x40000000), which would otherwise alias the 64-bit
numbers; then one JEQ per allowed number, falling through to the default
action.  Classic BPF jumps are 8-bit, so one flat list supports up to 255
syscalls, far more than the broker needs.

Actions:
* ``enforce``: SECCOMP_RET_KILL_PROCESS.  The kernel kills every thread at
  once; no handler can run, so nothing is named from inside.  The kernel's
  audit record (``type=SECCOMP ... syscall=N``, in dmesg/journald) names the
  syscall, and the parent sees "killed by SIGSYS".
* ``trap``: SECCOMP_RET_TRAP, for finding what is missing: the kernel sends
  SIGSYS synchronously and faulthandler's C-level handler (only write(2),
  async-signal-safe, never Python code) prints the Python stack that made
  the call, then re-raises SIGSYS with the default action, so the process
  still dies.  A Python-level signal.signal() handler would only run later,
  after the forbidden call had "returned", and a ctypes callback would
  take the GIL inside a signal handler; neither is safe.
* ``log``: SECCOMP_RET_LOG, everything is allowed and the kernel logs what
  the list lacks.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import struct
import sys
from collections.abc import Iterable

from . import prctl as sysprctl
from .libc import libc, raise_errno

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
RET_KILL_PROCESS = 0x80000000
RET_TRAP = 0x00030000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000
MODES = {"enforce": RET_KILL_PROCESS, "trap": RET_TRAP, "log": RET_LOG}

AUDIT_ARCH_X86_64 = 0xC000003E  # EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
X32_SYSCALL_BIT = 0x40000000

_BPF_LD_W_ABS = 0x00 | 0x00 | 0x20
_BPF_JEQ_K = 0x05 | 0x10 | 0x00
_BPF_JGE_K = 0x05 | 0x30 | 0x00
_BPF_RET_K = 0x06 | 0x00
_OFF_NR, _OFF_ARCH = 0, 4
MAX_JUMP = 255

_INSN = struct.Struct("=HBBI")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def audit_arch() -> int | None:
    """AUDIT_ARCH_* of this machine when we have an allowlist for it."""
    return AUDIT_ARCH_X86_64 if os.uname().machine == "x86_64" and sys.maxsize > 2**32 else None


def available() -> bool:
    try:
        with open("/proc/self/status") as f:
            return any(line.startswith("Seccomp:") for line in f)
    except OSError:
        return False


def build_program(arch: int, allowed: Iterable[int], default: int) -> bytes:
    numbers = sorted(set(allowed))
    if len(numbers) >= MAX_JUMP:
        raise ValueError(f"{len(numbers)} syscalls do not fit one flat classic-BPF list (max {MAX_JUMP - 1})")
    insns = [
        (_BPF_LD_W_ABS, 0, 0, _OFF_ARCH),
        (_BPF_JEQ_K, 1, 0, arch),
        (_BPF_RET_K, 0, 0, RET_KILL_PROCESS),  # another ABI: never allowed
        (_BPF_LD_W_ABS, 0, 0, _OFF_NR),
        (_BPF_JGE_K, 0, 1, X32_SYSCALL_BIT),
        (_BPF_RET_K, 0, 0, RET_KILL_PROCESS),  # x32 aliases of 64-bit numbers
    ]
    n = len(numbers)
    for i, nr in enumerate(numbers):
        insns.append((_BPF_JEQ_K, n - i, 0, nr))  # to RET ALLOW after RET default
    insns.append((_BPF_RET_K, 0, 0, default))
    insns.append((_BPF_RET_K, 0, 0, RET_ALLOW))
    return b"".join(_INSN.pack(*i) for i in insns)


def install(allowed: Iterable[int], mode: str) -> None:
    """Load the filter for this thread and its future children (irrevocable)."""
    arch = audit_arch()
    if arch is None:
        raise OSError(0, f"no seccomp allowlist for architecture {os.uname().machine}")
    program = build_program(arch, allowed, MODES[mode])
    if mode == "trap":
        # C-level, async-signal-safe reporter; chain=True re-raises SIGSYS
        # with its default action afterwards, so the process still dies.
        faulthandler.register(signal.SIGSYS, file=sys.stderr, all_threads=True, chain=True)
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // _INSN.size, ctypes.cast(buf, ctypes.c_void_p))
    # Filters need no_new_privs without CAP_SYS_ADMIN; harden_process set it,
    # but do not depend on that having happened.
    sysprctl.prctl(sysprctl.PR_SET_NO_NEW_PRIVS, 1)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0) != 0:
        raise_errno("prctl(PR_SET_SECCOMP)")
