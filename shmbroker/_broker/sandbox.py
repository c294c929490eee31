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

from typing import Any

from .._sys import landlock, seccomp
from .._sys.seccomp_allowlist import X86_64
from ..errors import ConfigError
from . import auth
from .inspector import ExeInspector

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


class Sandbox:
    """Landlock once listening, with the exe inspector forked just before."""

    def __init__(self, mode: str, seccomp_mode: str, socket_path: str, config_path: str | None) -> None:
        self.seccomp_mode = seccomp_mode
        if seccomp_mode != "off" and (not seccomp.available() or seccomp.audit_arch() is None):
            raise ConfigError(
                f"--seccomp {seccomp_mode}: no seccomp allowlist for this kernel/architecture "
                f"({os.uname().machine}); run with --seccomp off"
            )

        self.socket_path, self.config_path = socket_path, config_path
        self.inspector: Any = None
        self._verifier: auth.Verifier | None = None
        self.mode = mode
        self.enabled = mode != "off"
        if self.enabled and landlock.abi_version() <= 0:
            if mode == "on":
                raise ConfigError(
                    "--landlock on: this kernel has no Landlock (5.13+, enabled in lsm=); use --landlock auto or off"
                )
            log.warning("this kernel has no Landlock: the broker's filesystem access stays unrestricted")
            self.enabled = False

    def apply(self, broker: Any) -> None:
        self._landlock(broker)
        if self.seccomp_mode != "off":
            install_seccomp(self.seccomp_mode)

    def _landlock(self, broker: Any) -> None:
        if not self.enabled:
            return
        self.inspector = ExeInspector.start(None if self.seccomp_mode == "off" else self.seccomp_mode)
        self._verifier = broker.verifier
        self._verifier.inspector = self.inspector
        try:
            restrict(
                socket_path=self.socket_path, config_path=self.config_path,
                remove_socket_dir=broker.listener.created_directory,
            )
        except OSError as exc:
            if self.mode == "on":
                raise ConfigError(f"could not apply the Landlock sandbox: {exc.strerror or exc}") from None
            log.warning("Landlock sandbox not applied (%s); filesystem access stays unrestricted", exc.strerror or exc)
            self.close()

    def close(self) -> None:
        if self.inspector is not None:
            if self._verifier is not None:
                self._verifier.inspector = None
            self.inspector.close()
            self.inspector = None
