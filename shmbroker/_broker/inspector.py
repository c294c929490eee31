"""The exe inspector: an unsandboxed helper that stats /proc/PID/exe for the broker.

Once the broker is Landlock-restricted, the kernel denies it ptrace-mode
access to every process outside its sandbox (Landlock's ptrace hook), so
stat("/proc/PID/exe") fails with EACCES for every client and no peer could be
verified.  Before restricting itself the broker forks this helper, which
stays outside the sandbox and does exactly one thing: for a pid sent over a
SOCK_SEQPACKET socketpair it stats and reads /proc/PID/exe, reads
/proc/PID/cgroup and stats that cgroup's directory, and answers with an
:class:`Inspection`.

It needs no pidfd: the broker checks its own pidfd of the peer *after* the
answer arrives, and a pid cannot be reused while the process that holds it
is alive, so a pidfd still naming PID then proves the stat described the
peer (the same argument as in auth.py).  Passing no fds also keeps the
broker's sends free of SCM_RIGHTS, whose in-flight accounting is charged per
user: peers of the broker's own uid with fds queued on their sockets could
otherwise make those sends fail (ETOOMANYREFS).

It holds nothing else: every inherited fd is closed, it never sees segment
fds, it dies with the broker (PR_SET_PDEATHSIG) and exits when its socket
closes.  It inherits the broker's hardening (non-dumpable, no_new_privs,
only CAP_SYS_PTRACE), which is exactly what it needs, and under
``serve --seccomp`` it runs under the broker's syscall allowlist too.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import struct
import time
from typing import NamedTuple

from .._sys import cgroup as syscgroup
from .._sys import prctl as sysprctl
from .._sys import statx

log = logging.getLogger(__name__)

# Every request carries a sequence number that its reply echoes: after a
# timeout the late answer for an earlier peer must never be taken as the
# answer for the next one (that peer would be judged by someone else's exe).
_REQUEST = struct.Struct("<Qi")
# seq, errno, st_dev, st_ino, cgroup inode (0: unknown), has a cgroup path;
# then the exe path, a NUL, and the cgroup path.
_REPLY = struct.Struct("<QiQQQB")
MAX_REPLY = _REPLY.size + 2 * 4096 + 1  # two paths of at most PATH_MAX
# A stat and a readlink in /proc: far below a second even on a loaded machine.
# On timeout the peer is rejected (fail closed), never admitted.
REPLY_TIMEOUT = 5.0


class InspectorError(OSError):
    pass


class Inspection(NamedTuple):
    """What /proc says of a peer: its executable, and its cgroup v2 membership.

    ``cgroup`` is the path as /proc/PID/cgroup shows it to the broker (None:
    unreadable, or no cgroup2); ``cgroup_ino`` the inode of that cgroup's
    directory, which on cgroup2 is the cgroup id PIDFD_GET_INFO reports
    (None: not stat-able, e.g. outside the broker's cgroup namespace)."""

    dev: int
    ino: int
    path: str
    cgroup: str | None = None
    cgroup_ino: int | None = None


# Where cgroup2 is mounted, read once: the broker under Landlock may no
# longer be able to, and the inspector inherits it across fork.
_mount_cache: list[tuple[str, str] | None] = []


def cgroup2_mount() -> tuple[str, str] | None:
    if not _mount_cache:
        try:
            _mount_cache.append(syscgroup.cgroup2_mount())
        except OSError:
            _mount_cache.append(None)
        if _mount_cache[0] is None:
            log.warning(
                "cgroup2 is not mounted here: peers' cgroups are read from /proc/PID/cgroup alone, "
                "without the check of the path against the cgroup id of their pidfd"
            )
    return _mount_cache[0]


def inspect(pid: int) -> Inspection:
    """The inspection of ``pid`` from this process; OSError as os.stat of its exe would raise."""
    dev, ino = statx.identity(f"/proc/{pid}/exe")  # never waits on a FUSE server (see _sys/statx.py)
    try:
        path = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        path = "?"
    cgroup, cgroup_ino = syscgroup.membership(pid, cgroup2_mount())
    return Inspection(dev, ino, path, cgroup, cgroup_ino)


def _unpack(data: bytes) -> tuple[int, Inspection | OSError]:
    if len(data) < _REPLY.size:
        raise InspectorError(errno.EIO, "exe inspector is gone; peers cannot be verified until the broker restarts")
    seq, err, dev, ino, cg_ino, has_cgroup = _REPLY.unpack_from(data)
    if err:
        return seq, OSError(err, os.strerror(err))
    exe, _, cgroup = data[_REPLY.size:].partition(b"\0")
    return seq, Inspection(
        dev, ino, exe.decode(errors="replace"),
        cgroup.decode(errors="surrogateescape") if has_cgroup else None, cg_ino or None,
    )


class ExeInspector:
    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid
        self._seq = 0

    @classmethod
    def start(cls, seccomp_mode: str | None = None) -> ExeInspector:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        cgroup2_mount()  # once, inherited by the inspector
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns
            code = 1
            try:
                parent_sock.close()
                _serve(child_sock, parent, seccomp_mode)
                code = 0
            finally:
                os._exit(code)
        child_sock.close()
        parent_sock.settimeout(REPLY_TIMEOUT)
        log.info("exe inspector running as pid %d (it verifies /proc/PID/exe outside the Landlock sandbox)", pid)
        return cls(parent_sock, pid)

    def exe(self, pid: int) -> Inspection:
        """pid's executable and cgroup; OSError as os.stat of its exe would raise."""
        self._seq += 1
        deadline = time.monotonic() + REPLY_TIMEOUT
        try:
            self.sock.send(_REQUEST.pack(self._seq, pid))
            while True:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data = self.sock.recv(MAX_REPLY)
                seq, result = _unpack(data)
                if seq == self._seq:
                    break
                log.warning("discarded a late exe-inspector answer (request %d, now at %d)", seq, self._seq)
        except InspectorError:
            raise
        except OSError as exc:
            raise InspectorError(errno.EIO, f"exe inspector unavailable ({exc.strerror or exc})") from None
        if isinstance(result, OSError):
            raise result
        return result

    # -- pipelined: the broker asks and goes on serving others ----------------
    def fileno(self) -> int:
        return self.sock.fileno()

    def submit(self, pid: int) -> int:
        """Ask about ``pid`` without waiting; the answer comes from :meth:`collect` under the returned number."""
        self._seq += 1
        self.sock.setblocking(False)  # exe() sets its own timeout again
        try:
            self.sock.send(_REQUEST.pack(self._seq, pid))
        except OSError as exc:
            raise InspectorError(errno.EIO, f"exe inspector unavailable ({exc.strerror or exc})") from None
        return self._seq

    def collect(self) -> list[tuple[int, Inspection | OSError]]:
        """The answers that have arrived, without waiting; InspectorError once the inspector is gone."""
        out: list[tuple[int, Inspection | OSError]] = []
        self.sock.setblocking(False)
        while True:
            try:
                data = self.sock.recv(MAX_REPLY)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError as exc:
                raise InspectorError(errno.EIO, f"exe inspector unavailable ({exc.strerror or exc})") from None
            out.append(_unpack(data))

    def close(self) -> None:
        self.sock.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _serve(sock: socket.socket, parent: int, seccomp_mode: str | None) -> None:  # pragma: no cover - child process
    sysprctl.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:
        return  # the broker died before PDEATHSIG was armed
    keep = sock.fileno()
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGIO):
        signal.signal(signum, signal.SIG_DFL)
    # The broker's panic and reload signals are the broker's business.
    # `systemctl kill -s USR1` signals every process of the unit, this one
    # too, and SIGUSR1's default action would end it: every peer after the
    # panic would then be refused as unverifiable until a restart.
    for signum in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    # Only stderr (for a crash message) and our socket survive.
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    if seccomp_mode is not None:
        # The broker's own list: it covers stat, readlink, fdinfo reads and
        # the socket calls, and keeps exec, ptrace, socket() out.  Installed
        # silently: tools/seccomp_trace.py keys on the broker's log line.
        from .._sys import seccomp
        from .._sys.seccomp_allowlist import X86_64

        seccomp.install(X86_64.values(), seccomp_mode)
    while True:
        data = sock.recv(_REQUEST.size)
        if not data:
            return
        seq, pid = _REQUEST.unpack(data) if len(data) == _REQUEST.size else (0, -1)
        sock.send(_inspect(seq, pid))


def _inspect(seq: int, pid: int) -> bytes:  # pragma: no cover - child process
    if pid <= 0:
        return _REPLY.pack(seq, errno.EINVAL, 0, 0, 0, 0)
    try:
        found = inspect(pid)
    except OSError as exc:
        return _REPLY.pack(seq, exc.errno or errno.EIO, 0, 0, 0, 0)
    exe = found.path.encode(errors="surrogateescape").replace(b"\0", b"?")[:4096]
    cgroup = (found.cgroup or "").encode(errors="surrogateescape")
    # A cut path could match a pattern the whole one does not: send none
    # (the kernel itself renders at most PATH_MAX).
    known = found.cgroup is not None and len(cgroup) <= 4096
    head = _REPLY.pack(seq, 0, found.dev, found.ino, found.cgroup_ino or 0, known)
    return head + exe + b"\0" + (cgroup if known else b"")
