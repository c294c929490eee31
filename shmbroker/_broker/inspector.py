"""The exe inspector: an unsandboxed helper that stats /proc/PID/exe for the broker.

Once the broker is Landlock-restricted, the kernel denies it ptrace-mode
access to every process outside its sandbox (Landlock's ptrace hook), so
stat("/proc/PID/exe") fails with EACCES for every client and no peer could be
verified.  Before restricting itself the broker forks this helper, which
stays outside the sandbox and does exactly one thing: for a (pid, pidfd)
pair sent over a SOCK_SEQPACKET socketpair (the pidfd via SCM_RIGHTS) it
checks that the pidfd still names pid, stats and reads the exe link, checks
the pidfd again, and answers (errno, st_dev, st_ino, path).

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

from .._sys import fdpass, pidfd
from .._sys import prctl as sysprctl

log = logging.getLogger(__name__)

_REQUEST = struct.Struct("<i")
_REPLY = struct.Struct("<iQQ")
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

    def exe(self, pid: int, pfd: int) -> tuple[int, int, str]:
        """(st_dev, st_ino, path) of pid's executable; OSError as os.stat would raise."""
        try:
            fdpass.send_with_fds(self.sock, _REQUEST.pack(pid), [pfd])
            data = self.sock.recv(MAX_REPLY)
        except OSError as exc:
            raise InspectorError(errno.EIO, f"exe inspector unavailable ({exc.strerror or exc})") from None
        if len(data) < _REPLY.size:
            raise InspectorError(errno.EIO, "exe inspector is gone; peers cannot be verified until the broker restarts")
        err, dev, ino = _REPLY.unpack_from(data)
        if err:
            raise OSError(err, os.strerror(err))
        return dev, ino, data[_REPLY.size:].decode(errors="replace")

    def close(self) -> None:
        self.sock.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _serve(sock: socket.socket, parent: int, seccomp_mode: str | None) -> None:  # pragma: no cover - child process
    sysprctl.prctl(sysprctl.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return  # the broker died before PDEATHSIG was armed
    keep = sock.fileno()
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGIO):
        signal.signal(signum, signal.SIG_DFL)
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
        data, fds, _ = fdpass.recv_with_fds(sock, _REQUEST.size)
        if not data:
            return
        try:
            reply = _inspect(_REQUEST.unpack(data)[0] if len(data) == _REQUEST.size else -1, fds)
        finally:
            fdpass.close_all(fds)
        sock.send(reply)


def _inspect(pid: int, fds: list[int]) -> bytes:  # pragma: no cover - child process
    if pid <= 0 or len(fds) != 1:
        return _REPLY.pack(errno.EINVAL, 0, 0)
    pfd = fds[0]
    try:
        if pidfd.pidfd_pid(pfd) != pid:
            return _REPLY.pack(errno.ESRCH, 0, 0)
        st = os.stat(f"/proc/{pid}/exe")
        try:
            path = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            path = "?"
        if pidfd.pidfd_pid(pfd) != pid:
            return _REPLY.pack(errno.ESRCH, 0, 0)
    except OSError as exc:
        return _REPLY.pack(exc.errno or errno.EIO, 0, 0)
    return _REPLY.pack(0, st.st_dev, st.st_ino) + path.encode(errors="surrogateescape")[:4096]
