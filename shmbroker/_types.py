"""Types of the public API: the roles a peer attaches in, and the shape of
:meth:`shmbroker.ShmClient.status`'s result.

Exported from :mod:`shmbroker`; import them from there.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

from ._wire.vocabulary import ROLES, Role

__all__ = ["ROLES", "Role", "STATUS_SCHEMA", "Status", "StatusBroker", "StatusChannel", "StatusEvent", "StatusPeer"]

STATUS_SCHEMA = 1
"""Version of the JSON ``shmbroker status --json`` prints (a :class:`Status`
plus ``"schema"``).  Raised only when a key is removed or changes meaning;
new keys may appear at any version, so readers should ignore unknown keys."""


class StatusBroker(TypedDict):
    """The broker process answering :meth:`~shmbroker.ShmClient.status`."""

    version: str
    pid: int
    uid: int
    socket: str
    started: float  # time.time() when it started
    policy: str  # the config file, or "default"
    fds_charged: int  # the broker's fds that peers pin, across every uid
    fd_budget: int | None  # the most they may pin (RLIMIT_NOFILE less a reserve)


class StatusPeer(TypedDict):
    """One verified peer attached to a channel."""

    pid: int
    uid: int
    gid: int
    exe: str  # /proc/PID/exe at verification, for humans; decisions use its inode
    # Its systemd unit and cgroup v2 path (/proc/PID/cgroup as the broker
    # sees it) and LSM label (SO_PEERSEC) at verification; None if unknown.
    unit: str | None
    cgroup: str | None
    label: str | None
    role: Role
    generation: int | None  # the segment it maps
    revoked: bool  # still attached to a segment the broker revoked
    attached_at: float | None


class StatusChannel(TypedDict):
    """One channel: configured, or created on demand by a producer."""

    name: str
    size: int  # payload bytes
    backend: str  # "posix" or "memfd" (docs/config.md)
    ring: bool
    max_message: int | None  # ring channels only
    configured: bool
    generation: int  # bumps each time the channel gets a new segment
    live: bool  # whether a segment exists now
    peers: list[StatusPeer]


class StatusEvent(TypedDict):
    """A security event the broker recorded (docs/security.md)."""

    kind: str  # an EventKind value: "peer_rejected", "request_refused", "lease_broken", ...
    time: float
    pid: int | None
    uid: int | None
    detail: str  # what happened and why, for humans
    channel: str | None
    gid: int | None
    exe: str | None  # the peer's /proc/PID/exe at verification
    role: str | None  # the role it asked for
    rule: int | None  # index of the policy rule the peer fell under, where one did


class Status(TypedDict):
    """What :meth:`shmbroker.ShmClient.status` returns."""

    broker: StatusBroker
    channels: list[StatusChannel]
    connections: int
    counters: dict[str, int]
    security_events: list[StatusEvent]
    # How the broker is confined (user, Landlock, seccomp, capabilities);
    # docs/hardening.md lists the fields.  Absent from brokers that predate it.
    confinement: NotRequired[dict[str, Any]]
