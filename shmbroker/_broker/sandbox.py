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
import sysconfig

from typing import Any

from .._sys import landlock, seccomp
from .._sys.seccomp_allowlist import X86_64
from ..errors import ConfigError
from . import auth, confinement
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
    """Where Python can still import from: the interpreter's library
    directories, and the import root of every module loaded so far.

    Derived from where modules really came from, not from assumptions about
    the layout: Debian's /usr/bin/python3.11 builds ``select`` and others
    into the interpreter (no ``__file__``), keeps its own packages in
    /usr/lib/python3/dist-packages and pip's in /usr/local; a venv splits
    the stdlib from site-packages; a zipapp imports from one archive file.
    Not sys.path as a whole: its first entry is the working directory under
    ``python -m``, which is / under systemd and would open the whole
    filesystem for reading.
    """
    import msgpack  # noqa: F401  (loaded now, so its root is found below)

    import shmbroker  # noqa: F401

    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    # Extension modules of the stdlib (lib-dynload), wherever the build put them.
    roots.add(sysconfig.get_config_var("DESTSHARED") or "")
    for name, module in list(sys.modules.items()):
        root = _module_root(name, module)
        if root:
            roots.add(root)
    resolved = set()
    for root in roots:
        if not root:
            continue
        real = os.path.realpath(root)
        # Never "/": a module loaded from the working directory under
        # systemd would otherwise open the whole filesystem for reading.
        if real != "/" and os.path.exists(real):
            resolved.add(real)
    # A root inside another adds nothing (importlib inside the stdlib).
    return {r for r in resolved if not any(r.startswith(other + "/") for other in resolved)}


def _module_root(name: str, module: Any) -> str | None:
    """The sys.path entry a module was imported from, worked out from its
    file and dotted name (``a/b/c.py`` for ``b.c`` -> ``a``), so it holds
    for directories, site-packages and zip archives alike (for a zipapp the
    root is the archive file itself)."""
    spec = getattr(module, "__spec__", None)
    if spec is not None and spec.name:
        name = spec.name
    elif name == "__main__":
        return None  # a script run by path: its directory is not an import root
    origin = getattr(spec, "origin", None) if spec is not None else None
    path = origin if origin and origin not in ("built-in", "frozen") else getattr(module, "__file__", None)
    if not isinstance(path, str) or not os.path.isabs(path):
        return None
    levels = name.count(".") + 1
    if os.path.splitext(os.path.basename(path))[0] == "__init__":
        levels += 1  # pkg/__init__.py: the package directory is one more level
    root = path
    for _ in range(levels):
        root = os.path.dirname(root)
    return root


def restrict(*, socket_path: str, config_path: str | None, remove_socket_dir: bool = False) -> int:
    """Apply the sandbox; return the Landlock ABI it used."""
    return _restrict(socket_path=socket_path, config_path=config_path, remove_socket_dir=remove_socket_dir).abi


def _restrict(*, socket_path: str, config_path: str | None, remove_socket_dir: bool = False) -> landlock.Applied:
    allowed = rules(socket_path=socket_path, config_path=config_path, remove_socket_dir=remove_socket_dir)
    applied = landlock.apply(allowed)
    names = {landlock.READ: "r", landlock.READ_WRITE: "rw", landlock.ACCESS_FS_REMOVE_DIR: "rmdir"}
    log.info(
        "landlock ABI %d: filesystem restricted to %s",
        applied.abi, ", ".join(f"{path} ({names.get(access, hex(access))})" for path, access in allowed),
    )
    return applied


def install_seccomp(mode: str) -> None:
    """The syscall allowlist recorded by tools/seccomp_trace.py (docs/hardening.md)."""
    confinement.record_seccomp(mode)
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
        confinement.reset()
        confinement.record_names()
        if not self.enabled:
            confinement.record_landlock(mode, "off", reason="disabled with --landlock off")
            return
        support = landlock.probe()
        if support.available:
            return
        # "No Landlock" and "Landlock refused by a filter in front of us" are
        # different problems: the first is the machine, the second is a
        # deployment mistake an operator can fix in one line.
        reason = support.reason()
        confinement.record_landlock(mode, support.state, reason=reason)
        if mode == "on":
            fix = "fix the filter" if support.blocked else "use --landlock auto or off"
            raise ConfigError(f"--landlock on: {reason}; {fix}")
        if support.blocked:
            log.warning("SECURITY: %s; the broker's filesystem access stays unrestricted", reason)
        else:
            log.warning("%s: the broker's filesystem access stays unrestricted", reason)
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
            applied = _restrict(
                socket_path=self.socket_path, config_path=self.config_path,
                remove_socket_dir=broker.listener.created_directory,
            )
        except (OSError, landlock.LandlockUnavailable) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            confinement.record_landlock(self.mode, landlock.FAILED, reason=f"could not apply the Landlock sandbox: {reason}")
            if self.mode == "on":
                raise ConfigError(f"could not apply the Landlock sandbox: {reason}") from None
            log.warning("Landlock sandbox not applied (%s); filesystem access stays unrestricted", reason)
            self.close()
            return
        confinement.record_landlock(
            self.mode, "enforced", abi=applied.abi, rules=len(applied.rules), paths=[path for path, _ in applied.rules],
        )

    def close(self) -> None:
        if self.inspector is not None:
            if self._verifier is not None:
                self._verifier.inspector = None
            self.inspector.close()
            self.inspector = None
