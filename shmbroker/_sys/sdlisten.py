"""Socket activation (sd_listen_fds(3)) without libsystemd.

The fds passed by the service manager start at 3.  We accept exactly one, and
only if it really is what the broker would have created itself: a listening
AF_UNIX SOCK_STREAM socket.  Anything else (a datagram socket, a TCP port,
a file) is a misconfigured .socket unit and refuses the start, rather than
serving peers we could not authenticate with SO_PEERCRED.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat

SD_LISTEN_FDS_START = 3
_ENV = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


class ActivationError(Exception):
    """The inherited socket is unusable; the message says what to fix."""


def listen_socket() -> socket.socket | None:
    """The socket systemd passed us, or None when not socket-activated.

    Unsets LISTEN_* either way, so nothing we spawn inherits the claim.
    """
    fds, pid = os.environ.get("LISTEN_FDS"), os.environ.get("LISTEN_PID")
    for name in _ENV:
        os.environ.pop(name, None)
    if fds is None:
        return None
    if pid != str(os.getpid()):
        # Meant for another process (we were exec'd by a wrapper that
        # kept the environment); the fds are not ours to take.
        return None
    try:
        count = int(fds)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={fds!r} is not a number") from None
    if count != 1:
        raise ActivationError(
            f"socket activation passed {count} sockets; shmbroker.socket must declare exactly one ListenStream="
        )
    fd = SD_LISTEN_FDS_START
    try:
        st = os.fstat(fd)
    except OSError:
        raise ActivationError(f"LISTEN_FDS=1 but fd {fd} is not open") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ActivationError(f"fd {fd} from socket activation is not a socket")
    sock = socket.socket(fileno=fd)
    try:
        if sock.family != socket.AF_UNIX or sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_STREAM:
            raise ActivationError(
                f"fd {fd} from socket activation is not an AF_UNIX stream socket; use ListenStream=/path in the .socket unit"
            )
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ActivationError(f"fd {fd} from socket activation is not listening")
    except BaseException:
        sock.detach()
        raise
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    return sock
