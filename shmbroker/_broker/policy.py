"""Who may do what: a pure decision over a peer's verified identity.

The uid and groups (from SO_PEERCRED / SO_PEERGROUPS, frozen by the kernel at
connect) are the security boundary.  The executable match is defence in
depth: for Python peers /proc/PID/exe is the interpreter, and any same-uid
process can ptrace another one anyway.  Executables are compared by
(st_dev, st_ino), never by path string.

The cgroup (and the systemd unit it names) and the LSM label tell apart
peers that share a uid and an interpreter.  How far each can be trusted is
in docs/security.md ("What the unit, cgroup and label keys are worth"): a
cgroup only as far as the peer cannot write the cgroup.procs of the one it
wants to be in, a label as far as the LSM's policy confines the peer.
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
    # The cgroup v2 path as the broker reads /proc/PID/cgroup, or None when
    # it could not be established (no cgroup2, outside the broker's cgroup
    # namespace): rules with `units` or `cgroups` never match None.
    cgroup: str | None = None
    # From PIDFD_GET_INFO, where the kernel has it (6.13+): the cgroup's id,
    # which the inode of the cgroup directory read above was checked against.
    cgroup_id: int | None = None
    # SO_PEERSEC as recorded at connect(); None without an LSM that labels sockets.
    label: str | None = None

    @property
    def unit(self) -> str | None:
        return unit_of(self.cgroup)

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


# systemd.unit(5): the unit types; a cgroup directory named like one of
# these (other than a slice) is that unit's cgroup.
UNIT_SUFFIXES = frozenset({
    "service", "socket", "device", "mount", "automount", "swap", "target", "path", "timer", "slice", "scope",
})


def is_unit_name(name: str) -> bool:
    stem, dot, suffix = name.rpartition(".")
    return bool(dot and stem and suffix in UNIT_SUFFIXES and not stem.startswith("@"))


def unit_of(cgroup: str | None) -> str | None:
    """The systemd unit a cgroup v2 path belongs to, as systemd's
    cg_path_get_unit() finds it: the first component after the leading
    slices, if it is a unit name.

    "/system.slice/camera.service/worker" -> "camera.service";
    "/user.slice/user-1000.slice/user@1000.service/app.slice/x.service" ->
    "user@1000.service" (the user's manager: what runs inside it is the
    user's to arrange, so only `cgroups` can name it, see docs/security.md).
    """
    if cgroup is None:
        return None
    for part in cgroup.strip("/").split("/"):
        if part.endswith(".slice") and is_unit_name(part):
            continue
        return part if is_unit_name(part) else None
    return None


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


def _any_glob(value: str | None, patterns: tuple[str, ...] | None) -> bool:
    """None patterns: the key is absent, anything goes; an unknown value matches no pattern."""
    if patterns is None:
        return True
    return value is not None and any(fnmatch.fnmatchcase(value, p) for p in patterns)


@dataclasses.dataclass(frozen=True)
class Rule:
    principals: Principals
    executables: Executables | None  # None: any executable
    channels: tuple[str, ...] = ("*",)  # fnmatch patterns
    roles: frozenset[str] = ROLES
    create: bool = False  # producers may create matching channels on demand
    # fnmatch patterns; None: the key is absent, any unit/cgroup/label will do.
    units: tuple[str, ...] | None = None
    cgroups: tuple[str, ...] | None = None
    labels: tuple[str, ...] | None = None

    def matches_peer(self, identity: Identity) -> bool:
        return self.principals.matches(identity) and self.mismatch(identity) is None

    def mismatch(self, identity: Identity) -> str | None:
        """Which key beyond uids/gids this peer fails ("executables", "units",
        "cgroups", "labels"), or None when it passes them all."""
        if self.executables is not None and not self.executables.matches(identity):
            return "executables"
        if not _any_glob(identity.unit, self.units):
            return "units"
        if not _any_glob(identity.cgroup, self.cgroups):
            return "cgroups"
        if not _any_glob(identity.label, self.labels):
            return "labels"
        return None

    def allowed(self, key: str) -> list[str]:
        """What the rule allows for ``key``, for refusal messages."""
        if key == "executables":
            return list(self.executables.paths) if self.executables else []
        return list(getattr(self, key) or ())

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
        # Once each: several rules for one uid (by channel) would repeat it.
        allowed = "; ".join(dict.fromkeys(r.principals.describe() for r in self.rules)) or "no rules"
        return (
            f"permission denied: uid {identity.uid} (gid {identity.gid}) is not allowed "
            f"to use this broker ({allowed})"
        )

    def admit(self, identity: Identity) -> None:
        """Called at accept: refuse a peer that no rule could ever allow."""
        if self.status.matches(identity) or any(r.matches_peer(identity) for r in self.rules):
            return
        mine = [r for r in self.rules if r.principals.matches(identity)]
        if not mine:
            raise PermissionDenied(self._uid_refusal(identity))
        what, allowed = _refusal(identity, mine)
        raise PermissionDenied(f"permission denied: {what} of pid {identity.pid} is not allowed ({allowed})")

    def authorize_attach(self, identity: Identity, channel: str, role: str) -> Rule:
        """The first rule allowing this attach; raises PermissionDenied with the reason."""
        peer_rules = [r for r in self.rules if r.matches_peer(identity)]
        for rule in peer_rules:
            if rule.covers(channel, role):
                return rule
        covering = [r for r in self.rules if r.covers(channel, role)]
        mine = [r for r in covering if r.principals.matches(identity)]
        if mine:
            what, allowed = _refusal(identity, mine)
            raise PermissionDenied(f"permission denied: {what} may not attach to channel {channel!r} as {role} ({allowed})")
        if covering:
            who = "; ".join(dict.fromkeys(r.principals.describe() for r in covering))
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


def describe(identity: Identity, key: str) -> str:
    """The peer's value for a rule key, as refusals name it."""
    # Quoted: every one of these is a name the peer may have chosen.
    if key == "executables":
        return f"executable {quote(identity.exe_path)}"
    if key == "units":
        return f"unit {quote(identity.unit) if identity.unit else '(none)'} (cgroup {quote(identity.cgroup) if identity.cgroup else 'unknown'})"
    if key == "cgroups":
        return f"cgroup {quote(identity.cgroup) if identity.cgroup else 'unknown'}"
    return f"label {quote(identity.label) if identity.label is not None else '(none)'}"


def _refusal(identity: Identity, rules: list[Rule]) -> tuple[str, str]:
    """Why none of ``rules`` (each naming this peer's uid or a group) admits
    it: the peer's value for the key the first of them fails, and what those
    rules allow for that key."""
    failed = [(r, r.mismatch(identity)) for r in rules]
    key = next(k for _, k in failed if k is not None)
    allowed = sorted({a for r, k in failed if k == key for a in r.allowed(key)})
    return describe(identity, key), f"allowed {key}: {', '.join(allowed)}"


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
