"""Run a command with some syscalls failing with EPERM, the way systemd's
``SystemCallFilter=`` with ``SystemCallErrorNumber=EPERM`` makes every call
outside its sets fail (systemd 252's @system-service lists no landlock_*).

    python seccomp_deny.py NR[,NR...] -- COMMAND [ARG...]

A classic-BPF filter: EPERM for the listed x86-64 numbers, allow everything
else; then exec.  Built on shmbroker's own seccomp module.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys

from shmbroker._sys import prctl as sysprctl
from shmbroker._sys import seccomp
from shmbroker._sys.libc import libc, raise_errno

RET_ERRNO = 0x00050000


def deny(numbers: list[int], err: int = errno.EPERM) -> None:
    arch = seccomp.audit_arch()
    if arch is None:
        raise SystemExit("seccomp_deny: only x86-64 is supported")
    insns = [
        (seccomp._BPF_LD_W_ABS, 0, 0, seccomp._OFF_ARCH),
        (seccomp._BPF_JEQ_K, 1, 0, arch),
        (seccomp._BPF_RET_K, 0, 0, seccomp.RET_ALLOW),  # another ABI: not our business here
        (seccomp._BPF_LD_W_ABS, 0, 0, seccomp._OFF_NR),
    ]
    n = len(numbers)
    for i, nr in enumerate(numbers):
        insns.append((seccomp._BPF_JEQ_K, n - i, 0, nr))  # to RET ERRNO after RET ALLOW
    insns.append((seccomp._BPF_RET_K, 0, 0, seccomp.RET_ALLOW))
    insns.append((seccomp._BPF_RET_K, 0, 0, RET_ERRNO | err))
    program = b"".join(seccomp._INSN.pack(*i) for i in insns)
    buf = ctypes.create_string_buffer(program, len(program))
    prog = seccomp._SockFprog(len(program) // seccomp._INSN.size, ctypes.cast(buf, ctypes.c_void_p))
    sysprctl.prctl(sysprctl.PR_SET_NO_NEW_PRIVS, 1)
    if libc.prctl(seccomp.PR_SET_SECCOMP, seccomp.SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0) != 0:
        raise_errno("prctl(PR_SET_SECCOMP)")


def main() -> None:
    numbers, sep, *command = sys.argv[1:]
    if sep != "--" or not command:
        raise SystemExit(__doc__)
    deny([int(x) for x in numbers.split(",")])
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
