"""Where the broker's socket lives by default; shared by the broker and clients."""

from __future__ import annotations

import os

from .errors import ConfigError

# Lets an application (or `make demo`) point every client at one broker
# without threading socket_path through its code.
SOCKET_ENV = "SHMBROKER_SOCKET"
# sizeof(sockaddr_un.sun_path) on Linux: the longest socket path bind() takes.
SUN_PATH_MAX = 108


def default_socket_path() -> str:
    explicit = os.environ.get(SOCKET_ENV)
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "shmbroker", "broker.sock")
    if os.geteuid() == 0:
        return "/run/shmbroker/broker.sock"
    # Not a fixed name in /tmp: another user could create that directory
    # first and run a broker of their own there.  The home directory is
    # writable only by its owner, and short enough for AF_UNIX paths.
    suggestion = os.path.join(os.path.expanduser("~"), ".shmbroker", "broker.sock")
    raise ConfigError(
        f"no socket path: neither {SOCKET_ENV} nor XDG_RUNTIME_DIR is set; pass a socket path in a "
        f"directory only you can write, e.g. {suggestion} (the broker creates the last directory; "
        f"socket paths are limited to {SUN_PATH_MAX} bytes)"
    )
