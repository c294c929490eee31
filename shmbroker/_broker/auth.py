"""Verifying who is on the other end of an accepted socket.

Order matters (systemd's pidref_verify() follows the same shape):
1. SO_PEERCRED gives pid/uid/gid as frozen at connect(); SO_PEERGROUPS the
   supplementary groups.
2. SO_PEERPIDFD pins the process that connected, so a recycled pid cannot
   stand in for it.  Older kernels fall back to pidfd_open(pid), which is
   racy, and we log that downgrade.
   The LSM label comes from SO_PEERSEC (frozen at connect, like
   SO_PEERCRED), and on kernels with PIDFD_GET_INFO (6.13+) the id of the
   cgroup the pinned process is in, from the pidfd itself.
3. stat("/proc/PID/exe") gives the executable's (st_dev, st_ino);
   /proc/PID/cgroup its cgroup v2 path, whose directory's inode must be
   that cgroup id (a peer moved in between is refused, not guessed at).
4. The pidfd is consulted *after* the /proc reads: if it still names PID,
   they described the process that connected; if it says -1, that process
   died and the pid (and so what /proc said) may belong to someone else.

Any failure anywhere raises :class:`AuthError`; the caller turns every
exception, expected or not, into a rejection.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable

from .._escape import quote
from .._sys import cgroup as syscgroup
from .._sys import peercred, pidfd
from .inspector import ExeInspector, InspectorError, Inspection, cgroup2_mount, inspect
from .policy import Identity

log = logging.getLogger(__name__)

# Test seam for the "peer dies between getsockopt and /proc" race (issue A1):
# called with the pid after the credentials were read.  Always None in
# production: it is a plain module attribute that only Python code running
# inside the broker process can set (tests fork the broker from the test
# process, see tests/adversary.py); no config key, option or environment
# variable reaches it, and the broker logs a warning at start if it is set.
after_credentials_hook: Callable[[int], None] | None = None

# What /proc says of a pid (its executable and cgroup) as a value: the
# inspection, or the OSError it failed with.  Lets
# the broker ask the exe inspector and go on serving others while it
# answers (driver.py).
StatResult = Inspection | OSError


class AuthError(Exception):
    """The peer could not be verified; the message is safe to send to it."""


class VerifiedPeer:
    """An identity plus the pidfd that keeps pointing at that exact process."""

    __slots__ = ("identity", "pidfd", "pidfd_source")

    def __init__(self, identity: Identity, pidfd_fd: int, pidfd_source: str) -> None:
        self.identity = identity
        self.pidfd = pidfd_fd
        self.pidfd_source = pidfd_source

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class Verifier:
    """How the broker verifies peers, handed to it rather than kept in globals.

    ``inspector``: set by `serve --landlock` once the sandbox is applied; a
    Landlock-restricted broker may not stat other processes' /proc/PID/exe
    itself, so an unsandboxed helper does it (inspector.py)."""

    def __init__(self, inspector: ExeInspector | None = None) -> None:
        self.inspector = inspector

    def stat_now(self, pid: int) -> StatResult:
        """What /proc says of pid, read here (without an inspector), as a
        value (an OSError is one), as begin/finish pairs take it."""
        try:
            return inspect(pid)
        except OSError as exc:
            return exc


def _exe_identity(pid: int, stat: StatResult) -> tuple[tuple[int, int], str]:
    try:
        if isinstance(stat, OSError):
            raise stat
        dev, ino, path = stat.dev, stat.ino, stat.path
    except InspectorError as exc:
        raise AuthError(f"peer pid {pid} cannot be verified: {exc.strerror}") from None
    except (PermissionError, OSError) as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise AuthError(
                f"cannot read /proc/{pid}/exe: the peer is non-dumpable (or in another user "
                "namespace) and the broker lacks CAP_SYS_PTRACE to verify it"
            ) from None
        if exc.errno == errno.ENOENT:
            if _leader_exited(pid):
                raise AuthError(_LEADER_EXITED.format(pid=pid)) from None
            raise AuthError(f"peer pid {pid} exited before it could be verified (stale pid)") from None
        raise AuthError(f"cannot stat /proc/{pid}/exe: {exc.strerror}") from None
    return (dev, ino), path


_LEADER_EXITED = (
    "the main thread of pid {pid} has exited while other threads run on, so its executable "
    "(/proc/{pid}/exe) cannot be verified; keep the main thread alive in processes that use the broker"
)


def _leader_exited(pid: int) -> bool:
    """A zombie thread-group leader has no mm, hence no /proc/PID/exe, while
    its other threads still run (pthread_exit() in main)."""
    try:
        return any(int(tid) != pid for tid in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return False


class Probe:
    """A peer being verified: its credentials read and its process pinned by
    a pidfd, the stat of its executable still to come."""

    __slots__ = ("pid", "uid", "gid", "groups", "pidfd", "source", "cgroup_id", "label")

    def __init__(
        self, pid: int, uid: int, gid: int, groups: tuple[int, ...], pidfd_fd: int, source: str,
        cgroup_id: int | None = None, label: str | None = None,
    ) -> None:
        self.pid, self.uid, self.gid, self.groups = pid, uid, gid, groups
        self.pidfd = pidfd_fd
        self.source = source
        self.cgroup_id = cgroup_id  # from the pidfd, before /proc is read
        self.label = label

    def abandon(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def begin_verify(
    sock: socket.socket, credentials: tuple[int, int, int] | None = None, groups: tuple[int, ...] | None = None,
) -> Probe:
    """Pin the peer of ``sock`` (``credentials`` and ``groups``: SO_PEERCRED
    and SO_PEERGROUPS if already read, both frozen at connect); raises AuthError."""
    pid, uid, gid = credentials or peercred.peer_credentials(sock)
    if pid <= 0:
        # 0 means the peer's pid is not visible in our pid namespace.
        raise AuthError("peer has no pid visible to the broker (another pid namespace?)")
    try:
        pfd = pidfd.peer_pidfd(sock)
        source = "SO_PEERPIDFD"
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ESRCH):
            raise AuthError(f"peer pid {pid} exited before it could be verified (stale pid)") from None
        if exc.errno != errno.ENOPROTOOPT:
            raise AuthError(f"SO_PEERPIDFD failed: {exc.strerror}") from None
        log.warning("kernel lacks SO_PEERPIDFD; falling back to pidfd_open(%d), which a pid reuse race can fool", pid)
        try:
            pfd = pidfd.pidfd_open(pid)
        except OSError:
            raise AuthError(f"peer pid {pid} exited before it could be verified (stale pid)") from None
        source = "pidfd_open"
    try:
        if groups is None:
            groups = peercred.peer_groups(sock)
        label = peer_label(sock)
        cgroup_id = _pidfd_cgroup(pfd, pid)
        if after_credentials_hook is not None:
            after_credentials_hook(pid)
    except BaseException:
        os.close(pfd)
        raise
    return Probe(pid, uid, gid, groups, pfd, source, cgroup_id, label)


def peer_label(sock: socket.socket) -> str | None:
    """The peer's LSM label (SO_PEERSEC), or None without an LSM that labels
    sockets; None matches no `labels` pattern, so failing here fails closed."""
    try:
        raw = peercred.peer_security(sock)
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            log.warning("SO_PEERSEC failed (%s); the peer counts as unlabelled", exc.strerror)
        return None
    return raw.decode("utf-8", "surrogateescape")


def _pidfd_cgroup(pfd: int, pid: int) -> int | None:
    """The pinned peer's cgroup id, or None where the kernel cannot say."""
    try:
        return pidfd.cgroup_id(pfd)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise AuthError(f"peer pid {pid} exited before it could be verified (stale pid)") from None
        log.warning("PIDFD_GET_INFO failed for pid %d (%s); its cgroup is checked by path alone", pid, exc.strerror)
        return None


def _cgroup_identity(probe_id: int | None, stat: Inspection, pid: int) -> tuple[str | None, int | None]:
    """The peer's (cgroup path, cgroup id) for its identity.

    Where the pidfd gave an id, the path read from /proc must lead to the
    directory with that inode; a peer moved between the two reads is
    refused (it may try again), never admitted by the cgroup it left.  A
    path whose directory could not be checked then counts as unknown,
    unless no cgroup2 is mounted where the broker runs: then there is
    nothing to check against, and the path read under the pidfd is taken
    as on kernels without PIDFD_GET_INFO (the read itself is race-free;
    the id only catches a move during verification, which the close
    re-check catches as well)."""
    cgroup = stat.cgroup
    if cgroup is not None and syscgroup.outside_namespace(cgroup):
        # Above the root of our cgroup namespace: no rule can name it.
        return None, probe_id
    if probe_id is None or cgroup is None:
        return cgroup, probe_id
    if stat.cgroup_ino is None:
        if cgroup2_mount() is None:
            return cgroup, probe_id
        log.info("cgroup %s of pid %d cannot be checked against its cgroup id %d; counted as unknown", quote(cgroup or ""), pid, probe_id)
        return None, probe_id
    if stat.cgroup_ino != probe_id:
        raise AuthError(
            f"peer pid {pid} moved to another cgroup while it was being verified "
            f"(cgroup id {probe_id} before, {quote(cgroup or '')} with id {stat.cgroup_ino} after); connect again"
        )
    return cgroup, probe_id


def finish_verify(probe: Probe, stat: StatResult) -> VerifiedPeer:
    """The peer, once its executable's stat is in; raises AuthError (and lets go of the pidfd)."""
    pid = probe.pid
    try:
        exe, exe_path = _exe_identity(pid, stat)
        # Only now do we know the stat above described the connecting process
        # (one check after the stat covers a peer that was already gone too).
        if pidfd.pidfd_pid(probe.pidfd) != pid:
            raise AuthError(f"peer pid {pid} exited before it could be verified (stale pid)")
        # (_exe_identity raised for an OSError; should it ever not, the
        # cgroup is unknown, which no `units` or `cgroups` pattern matches.)
        cgroup, cgroup_id = (None, None) if isinstance(stat, OSError) else _cgroup_identity(probe.cgroup_id, stat, pid)
    except BaseException:
        probe.abandon()
        raise
    identity = Identity(
        pid, probe.uid, probe.gid, probe.groups, exe, exe_path, cgroup=cgroup, cgroup_id=cgroup_id, label=probe.label,
    )
    peer = VerifiedPeer(identity, probe.pidfd, probe.source)
    probe.pidfd = -1  # the peer owns it now
    return peer


def reverify(peer: VerifiedPeer, stat: StatResult) -> tuple[bool, str | None]:
    """(still the peer admitted, why not if it changed) before a late answer:
    strictly, so a stat that failed or a process that exited is not the same
    (fail closed); the reason is None when there is nothing to report (it
    exited)."""
    reason = recheck_result(peer, stat)
    if reason is not None or peer.pidfd < 0 or isinstance(stat, OSError):
        return False, reason
    # recheck_result also says None for a process that exited: the pidfd tells the two apart.
    return pidfd.pidfd_pid(peer.pidfd) == peer.identity.pid, None


def recheck_result(peer: VerifiedPeer, stat: StatResult) -> str | None:
    """Why the identity changed, given its executable's stat now, or None.

    A peer that has exited cannot be re-verified and is not an incident: most
    sessions end because the process exits.  A live peer whose executable is
    no longer the one it was admitted with (it exec()ed something else) is.
    """
    pid = peer.identity.pid
    if peer.pidfd < 0:
        return None
    if isinstance(stat, OSError):
        if pidfd.pidfd_pid(peer.pidfd) != pid:
            return None
        if stat.errno == errno.ENOENT:
            # A zombie has no mm, so no exe: it is exiting, not changing --
            # unless threads live on without their leader, which we can no
            # longer verify (fail closed).
            return _LEADER_EXITED.format(pid=pid) if _leader_exited(pid) else None
        return f"executable of pid {pid} can no longer be verified ({stat.strerror})"
    now = (stat.dev, stat.ino)
    try:
        now_id = pidfd.cgroup_id(peer.pidfd) if peer.identity.cgroup_id is not None else None
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            return f"cgroup of pid {pid} can no longer be verified (PIDFD_GET_INFO: {exc.strerror})"
        now_id = None  # exited: the pidfd check below says so
    if pidfd.pidfd_pid(peer.pidfd) != pid:
        return None
    identity = peer.identity
    if now != identity.exe:
        return (
            f"pid {pid} now runs {quote(stat.path)} (dev {now[0]}, inode {now[1]}), "
            f"not {quote(identity.exe_path)} it was admitted with"
        )
    # A peer moved to another cgroup while connected may now be in one no
    # rule admits: as for an exec, what it held is revoked.
    if identity.cgroup is not None and stat.cgroup != identity.cgroup:
        return f"pid {pid} is now in cgroup {quote(stat.cgroup or 'unknown')}, not {quote(identity.cgroup)} it was admitted in"
    if identity.cgroup_id is not None and now_id is not None and now_id != identity.cgroup_id:
        return f"pid {pid} is now in cgroup id {now_id}, not {identity.cgroup_id} it was admitted in ({quote(identity.cgroup or '')})"
    return None
