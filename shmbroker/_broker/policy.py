"""Who may do what: a pure decision over a peer's verified identity.

The uid and groups (from SO_PEERCRED / SO_PEERGROUPS, frozen by the kernel at
connect) are the security boundary.  The executable match is defence in
depth: for Python peers /proc/PID/exe is the interpreter, and any same-uid
process can ptrace another one anyway.  Executables are compared by
(st_dev, st_ino), never by path string.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os

from .._escape import quote
from .._wire.vocabulary import ROLES as _ROLES
from ..errors import PermissionDenied

ROLES: frozenset[str] = frozenset(_ROLES)


@dataclasses.dataclass(frozen=True)
class Identity:
    """A peer as verified at accept time."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]
    exe: tuple[int, int]  # (st_dev, st_ino) of /proc/PID/exe
    exe_path: str  # for humans only; never used for a decision

    @property
    def all_gids(self) -> frozenset[int]:
        return frozenset((self.gid, *self.groups))


@dataclasses.dataclass(frozen=True)
class Principals:
    """A set of uids and gids; a peer matches if its uid or any of its groups is in it."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    def matches(self, identity: Identity) -> bool:
        return identity.uid in self.uids or not self.gids.isdisjoint(identity.all_gids)

    def describe(self) -> str:
        uids = ", ".join(map(str, sorted(self.uids))) or "none"
        gids = ", ".join(map(str, sorted(self.gids))) or "none"
        return f"allowed uids: {uids}; gids: {gids}"


@dataclasses.dataclass(frozen=True)
class Executables:
    """Allowed executables, resolved to (st_dev, st_ino) when the policy loaded.

    Each one is pinned with an O_PATH fd for the broker's lifetime: once an
    allowed binary is deleted (a package upgrade), a free inode number is
    soon reused by some new file, which would then match.  A pinned inode
    cannot be reused.
    """

    ids: frozenset[tuple[int, int]]
    paths: tuple[str, ...]
    pins: tuple[int, ...] = dataclasses.field(default=(), compare=False, repr=False)

    @classmethod
    def from_paths(cls, paths: list[str]) -> Executables:
        ids = set()
        pins = []
        try:
            for path in paths:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                pins.append(fd)
                st = os.fstat(fd)
                ids.add((st.st_dev, st.st_ino))
        except BaseException:
            for fd in pins:
                os.close(fd)
            raise
        return cls(frozenset(ids), tuple(paths), tuple(pins))

    def matches(self, identity: Identity) -> bool:
        return identity.exe in self.ids


@dataclasses.dataclass(frozen=True)
class Rule:
    principals: Principals
    executables: Executables | None  # None: any executable
    channels: tuple[str, ...] = ("*",)  # fnmatch patterns
    roles: frozenset[str] = ROLES
    create: bool = False  # producers may create matching channels on demand

    def matches_peer(self, identity: Identity) -> bool:
        return self.principals.matches(identity) and (
            self.executables is None or self.executables.matches(identity)
        )

    def covers(self, channel: str, role: str) -> bool:
        return role in self.roles and any(fnmatch.fnmatchcase(channel, p) for p in self.channels)


@dataclasses.dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    status: Principals

    def check_connect(self, uid: int, gid: int, groups: tuple[int, ...]) -> None:
        """Refuse a peer no rule (nor the status rule) names by uid or group.

        Decidable from SO_PEERCRED and SO_PEERGROUPS alone, so an outsider is
        refused before the costlier executable check."""
        identity = Identity(pid=0, uid=uid, gid=gid, groups=groups, exe=(0, 0), exe_path="")
        if self.status.matches(identity) or any(r.principals.matches(identity) for r in self.rules):
            return
        raise PermissionDenied(self._uid_refusal(identity))

    def _uid_refusal(self, identity: Identity) -> str:
        allowed = "; ".join(r.principals.describe() for r in self.rules) or "no rules"
        return (
            f"permission denied: uid {identity.uid} (gid {identity.gid}) is not allowed "
            f"to use this broker ({allowed})"
        )

    def admit(self, identity: Identity) -> None:
        """Called at accept: refuse a peer that no rule could ever allow."""
        if self.status.matches(identity) or any(r.matches_peer(identity) for r in self.rules):
            return
        if not any(r.principals.matches(identity) for r in self.rules):
            raise PermissionDenied(self._uid_refusal(identity))
        allowed_exes = sorted({p for r in self.rules if r.executables for p in r.executables.paths})
        raise PermissionDenied(
            f"permission denied: executable {quote(identity.exe_path)} of pid {identity.pid} is not "
            f"allowed (allowed executables: {', '.join(allowed_exes)})"
        )

    def authorize_attach(self, identity: Identity, channel: str, role: str) -> Rule:
        """The first rule allowing this attach; raises PermissionDenied with the reason."""
        peer_rules = [r for r in self.rules if r.matches_peer(identity)]
        for rule in peer_rules:
            if rule.covers(channel, role):
                return rule
        covering = [r for r in self.rules if r.covers(channel, role)]
        if any(r.principals.matches(identity) for r in covering):
            exes = sorted({p for r in covering if r.executables for p in r.executables.paths})
            raise PermissionDenied(
                f"permission denied: executable {quote(identity.exe_path)} may not attach to channel "
                f"{channel!r} as {role} (allowed executables: {', '.join(exes)})"
            )
        if covering:
            who = "; ".join(r.principals.describe() for r in covering)
            raise PermissionDenied(
                f"permission denied: uid {identity.uid} may not attach to channel "
                f"{channel!r} as {role} ({who})"
            )
        raise PermissionDenied(
            f"permission denied: no rule allows {role}s on channel {channel!r}"
        )

    def rule_of(self, identity: Identity) -> int | None:
        """Index of the first rule naming this peer (uid/groups and executable), for audit records."""
        return next((i for i, r in enumerate(self.rules) if r.matches_peer(identity)), None)

    def permits(self, identity: Identity, channel: str, role: str) -> bool:
        """Whether some rule lets this peer attach to ``channel`` as ``role``."""
        return any(r.matches_peer(identity) and r.covers(channel, role) for r in self.rules)

    def may_create(self, identity: Identity, channel: str, role: str) -> bool:
        return role == "producer" and any(
            r.create and r.matches_peer(identity) and r.covers(channel, role) for r in self.rules
        )

    def may_query_status(self, identity: Identity) -> bool:
        return self.status.matches(identity)


def default_policy(broker_uid: int, broker_exe: str = "/proc/self/exe") -> Policy:
    """With no config: only the broker's own uid running the broker's own executable."""
    exe = os.stat(broker_exe)
    executables = Executables(frozenset({(exe.st_dev, exe.st_ino)}), (os.path.realpath(broker_exe),))
    principals = Principals(uids=frozenset({broker_uid}))
    return Policy(
        rules=(Rule(principals=principals, executables=executables, create=True),),
        # Root may always ask (config.status_principals says why).
        status=Principals(uids=frozenset({broker_uid, 0})),
    )
