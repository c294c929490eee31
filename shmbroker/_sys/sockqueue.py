"""How much a socket's peer has not read yet: ioctl(SIOCOUTQ).

For an AF_UNIX stream socket the bytes we sent stay charged to our socket
until the peer reads them, and so do the file descriptors riding with them
(SCM_RIGHTS in flight are also charged to the sending user, see unix(7)).
"""

from __future__ import annotations

import array
import fcntl
import socket
import termios

SIOCOUTQ = termios.TIOCOUTQ  # the same request number (asm-generic/sockios.h)


def unread_bytes(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that the peer has not read yet."""
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), SIOCOUTQ, buf, True)
    return buf[0]
