"""cgroup v2 membership: which cgroup a process is in, and the cgroup's id.

/proc/PID/cgroup is rendered relative to the cgroup namespace of the
process that *reads* it (kernel/cgroup/cgroup.c, proc_cgroup_show), never
of the process it describes: a peer that unshares a cgroup namespace sees
"/" in its own /proc/self/cgroup, while we still see where it really is.  A
cgroup outside our own namespace shows as a path beginning with "/..".

On cgroup2 the id of a cgroup (as PIDFD_GET_INFO reports it, see pidfd.py)
is the inode number of its directory, so the two can be compared.
"""

from __future__ import annotations

import os

CGROUP2 = "cgroup2"
# The list of active LSMs (securityfs); absent when securityfs is not mounted.
LSM_LIST = "/sys/kernel/security/lsm"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> tuple[str, str] | None:
    """(mount point, root within the hierarchy) of the first cgroup2 mount, or None."""
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index("-")
            except ValueError:
                continue
            if len(fields) > sep + 1 and fields[sep + 1] == CGROUP2:
                return _unescape(fields[4]), _unescape(fields[3])
    return None


def process_cgroup(pid: int) -> str | None:
    """The cgroup v2 path of ``pid`` (the ``0::`` line of /proc/PID/cgroup), or
    None if it has none (a cgroup v1-only system).  OSError as open() raises
    (ENOENT: no such process, or it is already reaped)."""
    fd = os.open(f"/proc/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
    finally:
        os.close(fd)
    return parse_cgroup_file(data)


# The kernel renders a cgroup path into a PATH_MAX buffer and cuts a longer
# one without saying so (6.18): a path this long may be a prefix of the
# real one, which a pattern could match when the whole path would not.
MAX_PATH = 4095


def parse_cgroup_file(data: bytes) -> str | None:
    """The ``0::`` path of a /proc/PID/cgroup text, or None if there is no
    single, whole one.

    Lines end at ``\n`` only: the kernel refuses a newline in a cgroup name,
    but not ``\r`` or other characters str.splitlines() also splits at, so a
    process owning a v1 cgroup (hybrid systems delegate one per user) could
    name it ``x\r0::/system.slice/camera.service`` and forge a line that way.
    Two ``0::`` lines, or a path that may have been cut, are unknown."""
    found = [line[3:] for line in data.split(b"\n") if line.startswith(b"0::")]
    if len(found) != 1 or len(found[0]) >= MAX_PATH:
        return None
    return found[0].decode("utf-8", "surrogateescape")


def outside_namespace(path: str) -> bool:
    """Whether ``path`` (as /proc/PID/cgroup shows it) lies above the root of
    the reader's cgroup namespace: shown as "/.." and up.  A cgroup merely
    named "..x" is inside."""
    return not path.startswith("/") or path == "/.." or path.startswith("/../")


def cgroup_directory(mount: tuple[str, str], path: str) -> str | None:
    """Where ``path`` (as /proc/PID/cgroup shows it) is under ``mount``, or None
    if it is outside what the mount shows (or outside our namespace)."""
    point, root = mount
    if outside_namespace(path):
        return None
    root = root.rstrip("/")
    if root:
        if path != root and not path.startswith(root + "/"):
            return None
        path = path[len(root):]
    return point.rstrip("/") + (path if path != "/" else "")


def cgroup_inode(directory: str) -> int:
    """The cgroup id of the cgroup at ``directory`` (its inode number on cgroup2)."""
    return os.stat(directory, follow_symlinks=False).st_ino


def active_lsms(path: str = LSM_LIST) -> list[str] | None:
    """The active LSMs, in order, or None where securityfs does not say."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return [name for name in f.read().strip().split(",") if name]
    except OSError:
        return None


def membership(pid: int, mount: tuple[str, str] | None) -> tuple[str | None, int | None]:
    """(cgroup v2 path of ``pid``, inode of that cgroup's directory), each None
    where it cannot be read; never raises for a missing cgroup, since the
    caller judges what an unknown cgroup means."""
    try:
        path = process_cgroup(pid)
    except OSError:
        return None, None
    if path is None or mount is None:
        return path, None
    directory = cgroup_directory(mount, path)
    if directory is None:
        return path, None
    try:
        return path, cgroup_inode(directory)
    except OSError:
        return path, None
