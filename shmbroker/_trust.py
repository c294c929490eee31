"""Whom to trust: which uids may be a client's broker, and which paths nobody
else can redirect.  Shared by the client (before it connects), the listener
(before it binds) and the config loader (before it reads the policy).

Two rules:

* **Broker identity.**  A client talks only to a broker whose ``SO_PEERCRED``
  uid it trusts: by default its own euid, root, and the ``shmbroker`` system
  user if that user exists (the shipped systemd units run the broker as it).
  An explicit expectation (``broker_uid=``, ``SHMBROKER_BROKER_USER``,
  ``[broker] user``) replaces that set with that uid and root; root can
  impersonate anyone anyway, so refusing it would protect nothing.
* **Trusted path.**  Every directory from ``/`` down to the object, and the
  object itself, must be owned by root or a trusted uid and must not be
  writable by group or others: whoever can write a directory can rename
  what is in it and put their own file (or broker) in its place.  A
  group- or world-writable directory with the sticky bit, like /tmp, is
  accepted only when its child on the path is owned by root or a trusted
  uid; since every component's owner is checked anyway, that holds as long
  as the caller checks the owner of the final object, which every caller
  here does.  This is OpenSSH's ``safe_path()`` (misc.c), sshd's StrictModes
  and sudo's sudoers check, with the sticky-directory exception that lets a
  0700 ``mkdtemp`` directory in /tmp pass.

Group-writable means any write bit for the group, including one that stands
for the mask of a POSIX ACL naming another user: refusing those as well is
the safe reading.

Symbolic links: paths are resolved once with :func:`os.path.realpath` and the
*resolved* chain is checked with ``lstat`` and then used for the actual
``connect``/``bind``/``open``.  Checking a symlink in place would not be
enough (whoever owns the directory holding it can retarget it after the
check), and following the original path after checking the resolved one
would re-resolve links an attacker may have changed in between.  The
resolved chain cannot change under us except by a trusted uid: that is
exactly the property checked.  A component that is no longer a directory, or a
final entry that became a symlink, means the path changed after it was
resolved: that raises OSError (ENOTDIR, ELOOP) rather than UnsafePath, since
only a trusted uid could have changed it, and trying again is the remedy.
"""

from __future__ import annotations

import errno
import functools
import grp
import os
import pwd
import shlex
import stat
from collections.abc import Collection, Iterable

from .errors import ConfigError

ROOT = 0
# The user the shipped systemd units (examples/systemd/) run the broker as.
SYSTEM_USER = "shmbroker"
# Names the broker's user (a name or a number) for every client of a process.
BROKER_USER_ENV = "SHMBROKER_BROKER_USER"
# Largest uid the kernel accepts; (uid_t)-1 means "unchanged" to chown/setreuid.
_MAX_UID = 2**32 - 2
# Write permission for the group or for others.
_SHARED_WRITE = stat.S_IWGRP | stat.S_IWOTH


class UnsafePath(Exception):
    """A component of a path that someone outside the trusted uids could change.

    ``message`` says which path, its owner and mode, and what is wrong;
    ``fix`` is a shell command that would repair it; ``foreign_owner`` tells
    whether the owner (rather than the mode) is the problem.
    """

    def __init__(self, path: str, st: os.stat_result, message: str, fix: str, *, foreign_owner: bool) -> None:
        super().__init__(message)
        self.path = path
        self.uid = st.st_uid
        self.mode = stat.S_IMODE(st.st_mode)
        self.message = message
        self.fix = fix
        self.foreign_owner = foreign_owner


def user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def user_label(uid: int) -> str:
    """``"1000 (alice)"``, or just the number for a uid without a passwd entry."""
    name = user_name(uid)
    return str(uid) if name is None else f"{uid} ({name})"


def _group_label(gid: int) -> str:
    try:
        return f"{gid} ({grp.getgrgid(gid).gr_name})"
    except KeyError:
        return str(gid)


def uids_label(uids: Iterable[int]) -> str:
    return ", ".join(user_label(u) for u in sorted(set(uids)))


@functools.lru_cache(maxsize=32)
def _uid_of_name(name: str) -> int | None:
    # Cached: a client resolves the same one or two names on every attach,
    # and an NSS lookup can cost more than the rest of the trust check.  A
    # user created after the process started is seen by the next process.
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def parse_user(value: int | str) -> int:
    """A uid from a number, a string of digits or a user name; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{value!r} is not a user name or uid")
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit():
            uid = _uid_of_name(text) if text else None
            if uid is None:
                raise ValueError(f"no such user: {value!r}")
            return uid
        value = int(text)
    if not 0 <= value <= _MAX_UID:
        raise ValueError(f"{value} is not a valid uid")
    return value


def broker_uids(expected: int | str | None = None) -> frozenset[int]:
    """The uids this process accepts as its broker (see the module docstring).

    ``expected`` (a uid or user name) wins over ``SHMBROKER_BROKER_USER``;
    either gives ``{that uid, 0}``.  A bad ``expected`` raises ValueError, a
    bad environment variable ConfigError.
    """
    if expected is None:
        env = os.environ.get(BROKER_USER_ENV, "").strip()
        if not env:
            uids = {os.geteuid(), ROOT}
            system = _uid_of_name(SYSTEM_USER)
            if system is not None:
                uids.add(system)
            return frozenset(uids)
        try:
            return frozenset({parse_user(env), ROOT})
        except ValueError as exc:
            raise ConfigError(f"{BROKER_USER_ENV}={env!r}: {exc}; set it to the broker's user name or uid") from None
    return frozenset({parse_user(expected), ROOT})


def resolve(path: str) -> str:
    """The absolute path with every symlink resolved (see the module docstring)."""
    return os.path.realpath(path)


def _chain(path: str) -> list[str]:
    """``/a/b`` -> ``["/", "/a", "/a/b"]``."""
    parts = []
    current = path
    while True:
        parts.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            return parts[::-1]
        current = parent


def check_entry(path: str, st: os.stat_result, trusted: Collection[int]) -> None:
    """One object: owned by a trusted uid, and not writable by group or
    others unless it is a sticky directory or a socket.

    A sticky directory lets others add entries but not rename or remove
    anyone else's, so it is safe as long as the next component is ours: the
    caller checks that component's owner.  A socket's write bits only say
    who may connect; they do not let anyone replace it.
    """
    if st.st_uid not in trusted:
        others = sorted(set(trusted) - {ROOT})
        allowed = "root" + (f" or uid{'s' if len(others) > 1 else ''} {uids_label(others)}" if others else "")
        raise UnsafePath(
            path, st,
            f"{path} belongs to uid {user_label(st.st_uid)} (mode {stat.S_IMODE(st.st_mode):04o}), not to {allowed}",
            f"chown root {shlex.quote(path)}", foreign_owner=True,
        )
    mode = st.st_mode
    if not mode & _SHARED_WRITE or stat.S_ISSOCK(mode):
        return
    if stat.S_ISDIR(mode) and mode & stat.S_ISVTX:
        return
    who = "everyone" if mode & stat.S_IWOTH else f"group {_group_label(st.st_gid)}"
    sticky = " and has no sticky bit" if stat.S_ISDIR(mode) else ""
    raise UnsafePath(
        path, st,
        f"{path} is writable by {who}{sticky} (mode {stat.S_IMODE(mode):04o}, owner uid {user_label(st.st_uid)})",
        f"chmod go-w {shlex.quote(path)}", foreign_owner=False,
    )


def check_directories(directory: str, trusted: Collection[int]) -> None:
    """Check every directory from ``/`` down to ``directory`` (absolute and
    already resolved) with lstat.

    Raises :class:`UnsafePath`, or the OSError of a missing, unreadable or
    changed component (FileNotFoundError, PermissionError, NotADirectoryError).
    """
    for component in _chain(directory):
        st = os.lstat(component)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), component)
        check_entry(component, st, trusted)


def check_path(resolved: str, trusted: Collection[int]) -> os.stat_result:
    """Check the directories of ``resolved`` (from :func:`resolve`) and the
    object itself; return the object's lstat."""
    check_directories(os.path.dirname(resolved), trusted)
    st = os.lstat(resolved)
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, "became a symbolic link while it was being checked", resolved)
    check_entry(resolved, st, trusted)
    return st


def resolve_and_check(path: str, trusted: Collection[int]) -> str:
    """:func:`resolve` then :func:`check_path`, in one pass of lstat calls
    when the path has no symlink, ``.`` or ``..`` in it (the common case:
    this runs on every attach, and realpath alone costs as much as the
    check).  Returns the resolved path."""
    absolute = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    parts = [part for part in absolute.split("/") if part]
    if "." in parts or ".." in parts:
        # Lexical ".." is wrong after a symlink; let realpath do it right.
        resolved = resolve(path)
        check_path(resolved, trusted)
        return resolved
    chain: list[tuple[str, os.stat_result]] = [("/", os.lstat("/"))]
    current = ""
    for part in parts:
        current = f"{current}/{part}"
        try:
            st = os.lstat(current)
        except PermissionError:
            # A directory we may not search: if it, or one above it, belongs
            # to someone we do not trust, that is what to report (they
            # could put any broker there), not the permission.
            for component, seen in chain:
                check_entry(component, seen, trusted)
            raise
        if stat.S_ISLNK(st.st_mode):
            resolved = resolve(path)
            check_path(resolved, trusted)
            return resolved
        chain.append((current, st))
    # Only now, once we know there is no symlink, do the components above
    # count: a symlink further down would have made them irrelevant.
    for component, st in chain[:-1]:
        check_entry(component, st, trusted)
    final, st = chain[-1]
    check_entry(final, st, trusted)
    return final
