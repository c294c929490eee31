"""Where the broker's socket lives by default; shared by the broker and clients."""

from __future__ import annotations

import os

from .errors import ConfigError

# Lets an application (or `make demo`) point every client at one broker
# without threading socket_path through its code.
SOCKET_ENV = "SHMBROKER_SOCKET"


def default_socket_path() -> str:
    explicit = os.environ.get(SOCKET_ENV)
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "shmbroker", "broker.sock")
    if os.geteuid() == 0:
        return "/run/shmbroker/broker.sock"
    raise ConfigError(
        f"no socket path: neither {SOCKET_ENV} nor XDG_RUNTIME_DIR is set; pass a socket path "
        "(inside a directory the broker may create, e.g. /tmp/shmbroker-$USER/broker.sock)"
    )
