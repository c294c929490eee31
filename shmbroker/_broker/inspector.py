"""The exe inspector: an unsandboxed helper that stats /proc/PID/exe for the broker.

Once the broker is Landlock-restricted, the kernel denies it ptrace-mode
access to every process outside its sandbox (Landlock's ptrace hook), so
stat("/proc/PID/exe") fails with EACCES for every client and no peer could be
verified.  Before restricting itself the broker forks this helper, which
stays outside the sandbox and does exactly one thing: for a pid sent over a
SOCK_SEQPACKET socketpair it stats and reads /proc/PID/exe and answers
(errno, st_dev, st_ino, path).

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

from .._sys import prctl as sysprctl
from .._sys import statx

log = logging.getLogger(__name__)

# Every request carries a sequence number that its reply echoes: after a
# timeout the late answer for an earlier peer must never be taken as the
# answer for the next one (that peer would be judged by someone else's exe).
_REQUEST = struct.Struct("<Qi")
_REPLY = struct.Struct("<QiQQ")
MAX_REPLY = _REPLY.size + 4096  # PATH_MAX
# A stat and a readlink in /proc: far below a second even on a loaded machine.
# On timeout the peer is rejected (fail closed), never admitted.
REPLY_TIMEOUT = 5.0


class InspectorError(OSError):
    pass


class ExeInspector:
    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid
        self._seq = 0

    @classmethod
    def start(cls, seccomp_mode: str | None = None) -> ExeInspector:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
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

    def exe(self, pid: int) -> tuple[int, int, str]:
        """(st_dev, st_ino, path) of pid's executable; OSError as os.stat would raise."""
        self._seq += 1
        deadline = time.monotonic() + REPLY_TIMEOUT
        try:
            self.sock.send(_REQUEST.pack(self._seq, pid))
            while True:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data = self.sock.recv(MAX_REPLY)
                if len(data) < _REPLY.size:
                    raise InspectorError(errno.EIO, "exe inspector is gone; peers cannot be verified until the broker restarts")
                seq, err, dev, ino = _REPLY.unpack_from(data)
                if seq == self._seq:
                    break
                log.warning("discarded a late exe-inspector answer (request %d, now at %d)", seq, self._seq)
        except InspectorError:
            raise
        except OSError as exc:
            raise InspectorError(errno.EIO, f"exe inspector unavailable ({exc.strerror or exc})") from None
        if err:
            raise OSError(err, os.strerror(err))
        return dev, ino, data[_REPLY.size:].decode(errors="replace")

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

    def collect(self) -> list[tuple[int, tuple[int, int, str] | OSError]]:
        """The answers that have arrived, without waiting; InspectorError once the inspector is gone."""
        out: list[tuple[int, tuple[int, int, str] | OSError]] = []
        self.sock.setblocking(False)
        while True:
            try:
                data = self.sock.recv(MAX_REPLY)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError as exc:
                raise InspectorError(errno.EIO, f"exe inspector unavailable ({exc.strerror or exc})") from None
            if len(data) < _REPLY.size:
                raise InspectorError(errno.EIO, "exe inspector is gone; peers cannot be verified until the broker restarts")
            seq, err, dev, ino = _REPLY.unpack_from(data)
            result: tuple[int, int, str] | OSError
            result = OSError(err, os.strerror(err)) if err else (dev, ino, data[_REPLY.size:].decode(errors="replace"))
            out.append((seq, result))

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
        return _REPLY.pack(seq, errno.EINVAL, 0, 0)
    try:
        dev, ino = statx.identity(f"/proc/{pid}/exe")
        try:
            path = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            path = "?"
    except OSError as exc:
        return _REPLY.pack(seq, exc.errno or errno.EIO, 0, 0)
    return _REPLY.pack(seq, 0, dev, ino) + path.encode(errors="surrogateescape")[:4096]
