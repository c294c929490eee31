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
import select
import sysconfig

from .._sys import landlock, seccomp
from .._sys.seccomp_allowlist import X86_64

log = logging.getLogger(__name__)


def rules(*, socket_path: str, config_path: str | None, remove_socket_dir: bool = False) -> list[tuple[str, int]]:
    socket_dir = os.path.dirname(os.path.abspath(socket_path))
    allowed: list[tuple[str, int]] = [
        (socket_dir, landlock.READ_WRITE),
        ("/dev/shm", landlock.READ_WRITE),
        ("/proc", landlock.READ),
    ]
    if remove_socket_dir:
        # The listener created the directory and removes it at shutdown;
        # rmdir needs REMOVE_DIR on the parent (only ever empty directories).
        allowed.append((os.path.dirname(socket_dir), landlock.ACCESS_FS_REMOVE_DIR))
    if config_path:
        allowed.append((os.path.abspath(config_path), landlock.READ))
    for path in sorted(_import_roots()):
        allowed.append((path, landlock.READ))
    return allowed


def _import_roots() -> set[str]:
    """Where Python can still import from: the stdlib, site-packages and the
    directories holding shmbroker and its dependencies.  Not sys.path as a
    whole: its first entry is the working directory under `python -m`, which
    is / under systemd and would open the whole filesystem for reading."""
    import msgpack

    import shmbroker as _pkg

    roots = {p for key, p in sysconfig.get_paths().items() if key in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots.add(os.path.dirname(os.__file__))
    roots.add(os.path.dirname(select.__file__ or os.__file__))  # lib-dynload: extension modules
    for module in (_pkg, msgpack):
        roots.add(os.path.dirname(os.path.dirname(os.path.abspath(module.__file__ or ""))))
    return {os.path.realpath(r) for r in roots if r and os.path.realpath(r) != "/" and os.path.isdir(r)}


def restrict(*, socket_path: str, config_path: str | None, remove_socket_dir: bool = False) -> int:
    """Apply the sandbox; return the Landlock ABI it used."""
    allowed = rules(socket_path=socket_path, config_path=config_path, remove_socket_dir=remove_socket_dir)
    abi = landlock.restrict_self(allowed)
    names = {landlock.READ: "r", landlock.READ_WRITE: "rw", landlock.ACCESS_FS_REMOVE_DIR: "rmdir"}
    log.info(
        "landlock ABI %d: filesystem restricted to %s",
        abi, ", ".join(f"{path} ({names.get(access, hex(access))})" for path, access in allowed),
    )
    return abi


def install_seccomp(mode: str) -> None:
    """The syscall allowlist recorded by tools/seccomp_trace.py (docs/hardening.md)."""
    seccomp.install(X86_64.values(), mode)
    # tools/seccomp_trace.py looks for this line: syscalls after it are the
    # ones the allowlist must contain.
    log.info("seccomp filter installed (%s, %d syscalls allowed)", mode, len(X86_64))
