"""The broker's own confinement, as `shmbroker status` reports it.

An operator verifying a deployment wants one command that says what the
running broker is actually held by, not what its unit file asks for: a
filter that silently refused Landlock (systemd 252's @system-service has no
``landlock_*``), a capability an ``AmbientCapabilities=`` line added, a core
limit some wrapper raised.  So everything that the kernel shows is read live
from /proc/self (``status``, ``limits``) on every status request, and
Landlock is checked by trying to read ``/``, which no rule ever grants.

Three things cannot be read back that way and are recorded when the sandbox
goes up: the Landlock ruleset (the kernel has no interface listing a
domain's rules), whether the broker installed its own seccomp filter, and
the user and group names (resolving a name reads /etc/passwd, which
Landlock then denies).  ``dumpable`` is read with prctl(2) unless the
broker's own seccomp filter is in place: that filter has no prctl in its
list, so the value recorded just before it went in cannot have changed.

Only /proc reads and one openat(2) happen per request: all of them are in
the seccomp allowlist (tools/seccomp_trace.py traces status requests).
"""

from __future__ import annotations

import dataclasses
import errno
import grp
import logging
import os
import pwd
from typing import Any

log = logging.getLogger(__name__)

# include/uapi/linux/capability.h, by number (Linux 6.18 knows 0-40).
CAPABILITY_NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
    "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
_CAP_FIELDS = {"CapEff": "effective", "CapPrm": "permitted", "CapInh": "inheritable", "CapBnd": "bounding", "CapAmb": "ambient"}
_SECCOMP_MODES = {0: "disabled", 1: "strict", 2: "filter"}
# What the broker itself holds at most (hardening.BROKER_CAPABILITIES, plus
# CAP_CHOWN with a socket group): anything else in the effective set means
# the hardening did not run or was overridden.
EXPECTED_CAPABILITIES = frozenset({"CAP_SYS_PTRACE", "CAP_CHOWN"})


@dataclasses.dataclass
class _Recorded:
    """What only the sandbox knows; see the module docstring."""

    landlock: dict[str, Any] | None = None
    seccomp: str = "off"  # the broker's own filter: off, enforce, trap, log
    dumpable: int | None = None  # read just before the broker's own filter went in
    names: dict[str, Any] | None = None


_recorded = _Recorded()


def reset() -> None:
    """Forget what was recorded (a fresh broker in the same process, in tests)."""
    global _recorded
    _recorded = _Recorded()


def record_names() -> None:
    """Resolve the user and group names now, while /etc is still readable."""
    uid, gid = os.getuid(), os.getgid()
    _recorded.names = {"user": _user_name(uid), "group": _group_name(gid), "uid": uid, "gid": gid}


def record_landlock(mode: str, state: str, *, abi: int = 0, rules: int = 0, reason: str = "", paths: list[str] | None = None) -> None:
    """``state``: enforced, off, absent, disabled, blocked or failed (see landlock.Support)."""
    _recorded.landlock = {"mode": mode, "state": state, "abi": abi, "rules": rules, "reason": reason, "paths": paths or []}


def record_seccomp(mode: str) -> None:
    """The broker is about to install its own filter: keep what prctl would say from now on."""
    _recorded.dumpable = _dumpable_live()
    _recorded.seccomp = mode


def landlock_state() -> dict[str, Any] | None:
    return None if _recorded.landlock is None else dict(_recorded.landlock)


def report() -> dict[str, Any]:
    """The running broker's confinement, for the status reply."""
    fields = _proc_fields("/proc/self/status")
    return {
        "user": _user(fields),
        "landlock": _landlock(),
        "seccomp": _seccomp(fields),
        "no_new_privs": _int(fields.get("NoNewPrivs")) == 1,
        "dumpable": _dumpable(),
        "capabilities": {name: _cap_names(fields.get(key)) for key, name in _CAP_FIELDS.items()},
        "rlimit_core": _core_limit(),
    }


def _landlock() -> dict[str, Any]:
    recorded = landlock_state() or {
        "mode": None, "state": "none", "abi": 0, "rules": 0, "paths": [],
        "reason": "the broker was not started by `shmbroker serve`, which sets up the sandbox",
    }
    recorded["verified"] = _root_unreadable() if recorded["state"] == "enforced" else False
    return recorded


def _root_unreadable() -> bool:
    """No rule ever grants /: reading it fails with EACCES exactly when Landlock is in force."""
    try:
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno == errno.EACCES
    os.close(fd)
    return False


def _seccomp(fields: dict[str, str]) -> dict[str, Any]:
    mode = _int(fields.get("Seccomp"))
    return {
        "mode": mode,
        "mode_name": _SECCOMP_MODES.get(mode or 0, "unknown") if mode is not None else "unknown",
        # Every filter in force, the service manager's included (Linux 5.9+).
        "filters": _int(fields.get("Seccomp_filters")),
        "broker_filter": _recorded.seccomp,
    }


def _dumpable() -> int | None:
    if _recorded.seccomp != "off":
        return _recorded.dumpable
    return _dumpable_live()


def _dumpable_live() -> int | None:
    from .._sys import prctl as sysprctl

    try:
        return sysprctl.prctl(sysprctl.PR_GET_DUMPABLE)
    except OSError:
        return None


def _user(fields: dict[str, str]) -> dict[str, Any]:
    # Uid: real, effective, saved, filesystem.
    uids = [int(x) for x in fields.get("Uid", "").split()] or [os.getuid()] * 4
    gids = [int(x) for x in fields.get("Gid", "").split()] or [os.getgid()] * 4
    groups = [int(x) for x in fields.get("Groups", "").split()]
    names = _recorded.names
    if names is None or names["uid"] != uids[0] or names["gid"] != gids[0]:
        # No sandbox recorded them (a broker run without `serve`): look them
        # up now; nothing stops reading /etc then.
        names = {"user": _user_name(uids[0]), "group": _group_name(gids[0])}
    return {
        "uid": uids[0], "euid": uids[1], "gid": gids[0], "egid": gids[1], "groups": groups,
        "name": names["user"], "group": names["group"],
    }


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OSError):
        return None


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except (KeyError, OSError):
        return None


def _cap_names(hex_mask: str | None) -> list[str]:
    if not hex_mask:
        return []
    mask = int(hex_mask, 16)
    return [
        CAPABILITY_NAMES[bit] if bit < len(CAPABILITY_NAMES) else f"cap_{bit}"
        for bit in range(mask.bit_length()) if mask >> bit & 1
    ]


def _core_limit() -> dict[str, int | None]:
    """From /proc/self/limits, not getrlimit(2), which the allowlist does not carry.
    ``None`` means unlimited."""
    try:
        with open("/proc/self/limits") as f:
            for line in f:
                if line.startswith("Max core file size"):
                    soft, hard = line[len("Max core file size"):].split()[:2]
                    return {"soft": _limit(soft), "hard": _limit(hard)}
    except OSError:
        pass
    return {"soft": None, "hard": None}


def _limit(text: str) -> int | None:
    return None if text == "unlimited" else int(text)


def _proc_fields(path: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    except OSError as exc:
        log.warning("cannot read %s for the confinement report: %s", path, exc.strerror)
    return fields


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def problems(confinement: dict[str, Any]) -> list[tuple[str, str]]:
    """What falls short in a status reply's confinement, as (severity, text)
    with severity "warn" or "fail"; used by `doctor` and the systemd test."""
    out: list[tuple[str, str]] = []
    landlock = confinement.get("landlock", {})
    if landlock.get("state") != "enforced":
        severity = "fail" if landlock.get("state") == "blocked" else "warn"
        out.append((severity, f"Landlock is not in force ({landlock.get('state')}): {landlock.get('reason') or 'no reason given'}"))
    elif not landlock.get("verified"):
        out.append(("fail", "Landlock was applied but the broker can still read /"))
    if (confinement.get("seccomp", {}).get("mode") or 0) < 2:
        out.append(("warn", "no seccomp filter is in force (run under the shipped unit, or with --seccomp enforce)"))
    if not confinement.get("no_new_privs"):
        out.append(("fail", "no_new_privs is not set"))
    if confinement.get("dumpable") != 0:
        out.append(("fail", f"the broker is dumpable ({confinement.get('dumpable')}): same-uid processes can ptrace it"))
    extra = sorted(set(confinement.get("capabilities", {}).get("effective", [])) - EXPECTED_CAPABILITIES)
    if extra:
        out.append(("fail", f"unexpected effective capabilities: {', '.join(extra)}"))
    core = confinement.get("rlimit_core", {})
    if core.get("soft") != 0 or core.get("hard") != 0:
        out.append(("fail", f"RLIMIT_CORE is not 0 (soft {core.get('soft')}, hard {core.get('hard')})"))
    if confinement.get("user", {}).get("euid") == 0:
        out.append(("warn", "the broker runs as root; the shipped unit runs it as the shmbroker user"))
    return out
