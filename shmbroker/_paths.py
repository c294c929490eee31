"""Where the broker's socket lives by default; shared by the broker and clients."""

from __future__ import annotations

import os

from .errors import ConfigError

# Lets an application (or `make demo`) point every client at one broker
# without threading socket_path through its code.
SOCKET_ENV = "SHMBROKER_SOCKET"
# sizeof(sockaddr_un.sun_path) on Linux: the longest socket path bind() takes.
SUN_PATH_MAX = 108
# The system broker's socket: shmbroker.socket (examples/systemd/) listens
# here.  Clients of any uid fall back to it, as D-Bus clients find the system
# bus at /run/dbus/system_bus_socket without being told.
SYSTEM_SOCKET = "/run/shmbroker/broker.sock"


def default_socket_path() -> str:
    explicit = os.environ.get(SOCKET_ENV)
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "shmbroker", "broker.sock")
    if os.geteuid() == 0:
        return SYSTEM_SOCKET
    # Not a fixed name in /tmp: another user could create that directory
    # first and run a broker of their own there.  The home directory is
    # writable only by its owner, and short enough for AF_UNIX paths.
    suggestion = os.path.join(os.path.expanduser("~"), ".shmbroker", "broker.sock")
    raise ConfigError(
        f"no socket path: neither {SOCKET_ENV} nor XDG_RUNTIME_DIR is set; pass a socket path in a "
        f"directory only you can write, e.g. {suggestion} (the broker creates the last directory; "
        f"socket paths are limited to {SUN_PATH_MAX} bytes)"
    )


def user_socket_path() -> str | None:
    """The per-user broker's socket, when XDG_RUNTIME_DIR is set."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "shmbroker", "broker.sock") if runtime else None


def client_socket_path() -> str:
    """Where a client looks for its broker when it is not given a path.

    ``$SHMBROKER_SOCKET`` if set; else the per-user broker's socket if one
    is there; else the system broker's, whatever this process's uid.  The
    path is only a suggestion: the client trusts it only after checking its
    directories and the uid listening on it (_trust.py, _client.py).
    """
    explicit = os.environ.get(SOCKET_ENV)
    if explicit:
        return explicit
    user = user_socket_path()
    if user is not None and _present(user):
        return user
    if _present(SYSTEM_SOCKET):
        return SYSTEM_SOCKET
    tried = ([user] if user else []) + [SYSTEM_SOCKET]
    raise FileNotFoundError(
        f"no broker socket found (looked for {' and '.join(tried)}); start one with `shmbroker serve`, "
        f"or set {SOCKET_ENV} to the socket of a running broker"
    )


def _present(path: str) -> bool:
    """The entry exists, or we may not look (a directory for another group:
    connecting then says that, which is more use than "not found")."""
    try:
        os.lstat(path)
    except PermissionError:
        return True
    except OSError:
        return False
    return True
