"""`shmbroker doctor`: which kernel and environment features this machine has,
and what each missing one means for security.

Every check probes the real kernel (creates a segment, takes a lease, asks
for a pidfd...) rather than reading version numbers, because distributions
backport and disable features independently of the version.

Exit status: 0 when every check is OK, 1 when there are warnings (the
broker runs, with reduced protection), 2 when an essential is missing (it
cannot run securely).  The text output ends with a summary line saying which.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import resource
import secrets
import socket
import sys
from collections.abc import Callable
from typing import Any

OK, WARN, FAIL = "ok", "warn", "fail"
_EXIT = {OK: 0, WARN: 1, FAIL: 2}
EXIT_STATUS_HELP = (
    "exit status: 0 every check OK; 1 warnings: the broker runs with reduced protection (each warning "
    "says what is lost); 2 missing essentials: the broker cannot run securely here"
)


@dataclasses.dataclass
class Check:
    name: str
    status: str
    detail: str
    consequence: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--broker", metavar="SOCKET", nargs="?", const="", default=None,
        help="also check how a running broker is confined (Landlock, seccomp, capabilities...) through its "
        "status; SOCKET defaults to where clients look (e.g. /run/shmbroker/broker.sock)",
    )
    parser.add_argument("--broker-user", metavar="USER", help="user name or uid that broker must run as (as for status)")


def run(args: argparse.Namespace) -> int:
    checks = [probe() for probe in PROBES]
    if getattr(args, "broker", None) is not None:
        checks.extend(check_running_broker(args.broker or None, getattr(args, "broker_user", None)))
    if args.json:
        json.dump([dataclasses.asdict(c) for c in checks], sys.stdout, indent=2)
        print()
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"{c.status.upper():<4}  {c.name:<{width}}  {c.detail}")
            if c.consequence and c.status != OK:
                print(f"{'':<4}  {'':<{width}}  -> {c.consequence}")
        print(summary(checks))
    return max(_EXIT[c.status] for c in checks)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def summary(checks: list[Check]) -> str:
    """One line: how many checks passed, which did not, what that means, and the exit status."""
    failed = [c.name for c in checks if c.status == FAIL]
    warned = [c.name for c in checks if c.status == WARN]
    passed = len(checks) - len(failed) - len(warned)
    if failed:
        verdict = (
            f"{_count(len(failed), 'missing essential')} ({', '.join(failed)}): the broker cannot run securely "
            "here until that is fixed"
        )
        if warned:
            verdict = f"{_count(len(warned), 'warning')} ({', '.join(warned)}), {verdict}"
        return f"summary: {passed} OK, {verdict}; exit status 2"
    if warned:
        return (
            f"summary: {passed} OK, {_count(len(warned), 'warning')} ({', '.join(warned)}): the broker runs here with "
            "reduced protection (the -> lines say what is lost); exit status 1"
        )
    return f"summary: all {len(checks)} checks OK; exit status 0"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def check_leases() -> Check:
    from ._sys import lease, shm

    name = "/shmbroker-doctor-" + secrets.token_hex(8)
    try:
        fd = shm.shm_open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0)
    except OSError as exc:
        return Check("leases", FAIL, f"shm_open failed: {exc.strerror}", "the broker cannot create segments at all (is /dev/shm mounted?)")
    try:
        shm.shm_unlink(name)
        lease.take_write_lease(fd)
        lease.release_lease(fd)
    except OSError as exc:
        enabled = _read("/proc/sys/fs/leases-enable")
        return Check(
            "leases", FAIL, f"F_SETLEASE refused: {exc.strerror} (fs.leases-enable={enabled})",
            "no proof that nobody opened a segment during creation, and no alarm when root opens it later",
        )
    finally:
        os.close(fd)
    break_time = _read("/proc/sys/fs/lease-break-time")
    detail = f"write leases work; lease-break-time {break_time or '?'} s"
    if break_time is not None and int(break_time) < 1:
        return Check(
            "leases", WARN, detail,
            "an intruder's open() is blocked for under a second; the broker's wipe may lose the race on a loaded machine",
        )
    return Check("leases", OK, detail, "")


def check_pidfd() -> Check:
    from ._sys import pidfd

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            fd = pidfd.peer_pidfd(a)
            os.close(fd)
            return Check("SO_PEERPIDFD", OK, "peers are pinned by pidfd at connect (Linux 6.5+)")
        except OSError as exc:
            if exc.errno != errno.ENOPROTOOPT:
                return Check("SO_PEERPIDFD", FAIL, f"getsockopt failed: {exc.strerror}", "peers cannot be verified")
        try:
            os.close(pidfd.pidfd_open(os.getpid()))
        except OSError as exc:
            return Check("SO_PEERPIDFD", FAIL, f"neither SO_PEERPIDFD nor pidfd_open ({exc.strerror})",
                         "the broker cannot tell a peer from a process that reused its pid")
        return Check("SO_PEERPIDFD", WARN, "missing (kernel < 6.5); pidfd_open fallback in use",
                     "a peer that exits between connect and verification can have its pid reused (polkit CVE-2019-6133 style)")
    finally:
        a.close()
        b.close()


def check_landlock() -> Check:
    from ._sys import landlock

    support = landlock.probe()
    if support.blocked:
        # The kernel has Landlock, but something in front of this very
        # process refuses it: a broker started the same way runs unconfined.
        return Check("landlock", FAIL, support.reason(),
                     "a broker started like this process runs with unrestricted filesystem access "
                     "(`serve --landlock auto` warns, `--landlock on` refuses to start)")
    if not support.available:
        return Check("landlock", WARN, support.reason(),
                     "a compromised broker can read and write anything its uid can; `serve --landlock on` refuses to start")
    abi = support.abi
    extra = "" if abi >= 3 else " (ABI < 3: ftruncate is not restricted)"
    return Check("landlock", OK, f"ABI {abi}{extra}; `serve` restricts itself to its socket dir, /dev/shm, config, imports and /proc")


def check_memfd_seals() -> Check:
    from ._sys import memfd

    try:
        fd = memfd.memfd_create("shmbroker-doctor")
    except OSError as exc:
        return Check("memfd seals", WARN, f"memfd_create failed: {exc.strerror}", "the memfd backend is unavailable")
    try:
        memfd.add_seals(fd, memfd.SIZE_SEALS)
        seals = memfd.get_seals(fd)
    except OSError as exc:
        return Check("memfd seals", WARN, f"sealing refused: {exc.strerror}",
                     "a producer could truncate a memfd segment and crash readers with SIGBUS")
    finally:
        os.close(fd)
    ok = seals & memfd.SIZE_SEALS == memfd.SIZE_SEALS
    return Check("memfd seals", OK if ok else WARN, "F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL work" if ok else "seals did not stick",
                 "" if ok else "truncation (SIGBUS) cannot be ruled out for memfd segments")


def check_mlock() -> Check:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)

    def fmt(v: int) -> str:
        return "unlimited" if v == resource.RLIM_INFINITY else f"{v // 1024} KiB"

    from ._sys.prctl import get_caps

    has_ipc_lock = bool(get_caps()[0] >> 14 & 1)
    detail = f"RLIMIT_MEMLOCK soft {fmt(soft)}, hard {fmt(hard)}" + ("; CAP_IPC_LOCK held" if has_ipc_lock else "")
    if has_ipc_lock or hard == resource.RLIM_INFINITY:
        return Check("mlock limit", OK, detail)
    return Check("mlock limit", WARN, detail,
                 f"clients can lock at most {fmt(hard)} of segments; larger ones may be swapped out "
                 "(raise with ulimit -l / LimitMEMLOCK=)")


def check_ptrace() -> Check:
    scope = _read("/proc/sys/kernel/yama/ptrace_scope")
    if scope is None:
        return Check("ptrace restrictions", WARN, "Yama LSM absent: any process may ptrace others of its uid",
                     "only non-dumpable processes are safe from same-uid ptrace: the broker hardens itself; "
                     "clients should use attach(harden=True)")
    meaning = {"0": "classic (same uid may attach)", "1": "restricted to descendants", "2": "admin only", "3": "no attach"}
    status = WARN if scope == "0" else OK
    return Check("ptrace restrictions", status, f"yama ptrace_scope={scope} ({meaning.get(scope, '?')})",
                 "same-uid processes can read clients' segments through ptrace unless they harden themselves" if status == WARN else "")


def check_coredumps() -> Check:
    pattern = _read("/proc/sys/kernel/core_pattern") or "?"
    suid = _read("/proc/sys/fs/suid_dumpable") or "?"
    detail = f"core_pattern {pattern!r}, fs.suid_dumpable={suid}"
    if suid == "1":
        return Check("core dumps", WARN, detail, "non-dumpable processes still dump core (suid_dumpable=1): secrets may reach disk")
    return Check("core dumps", OK, detail + "; the broker sets RLIMIT_CORE=0 and MADV_DONTDUMP on segments")


def check_seccomp() -> Check:
    from ._sys import seccomp

    if not seccomp.available():
        return Check("seccomp", WARN, "seccomp filters unavailable", "`serve --seccomp` cannot be used")
    if seccomp.audit_arch() is None:
        return Check("seccomp", WARN, f"no allowlist for architecture {os.uname().machine}", "`serve --seccomp` is refused here")
    return Check("seccomp", OK, f"filters available ({os.uname().machine}); `serve --seccomp enforce|log` can be used")


def check_ring_core() -> Check:
    """Whether ring channels run on the C core, the Python fallback, or not at all."""
    from ._ring import native

    if native.available():
        return Check("ring core", OK, "the C core (shmbroker._ring_native, C11 atomics) runs ring channels")
    if native.python_fallback_is_sound():
        return Check(
            "ring core", WARN, "shmbroker._ring_native is missing: ring channels use the pure-Python fallback",
            "rings are several times slower (reinstall shmbroker with gcc and the Python headers to build the C core)",
        )
    return Check(
        "ring core", FAIL, f"shmbroker._ring_native is missing and this CPU ({native.machine()}) is not x86-64",
        "attaching a ring channel is refused (the Python fallback relies on x86-64 memory ordering); reinstall "
        "shmbroker with gcc and the Python headers (apt-get install gcc python3-dev)",
    )


def check_running_broker(socket_path: str | None, broker_user: str | None) -> list[Check]:
    """The confinement a running broker reports about itself (its status).

    This machine's probes above say what the kernel offers this process; a
    broker under a service manager can get less (a seccomp filter that
    refuses Landlock, say), and only the broker can tell."""
    from . import errors
    from ._broker.confinement import problems
    from ._client import ShmClient

    try:
        status = ShmClient.status(socket_path=socket_path, broker_uid=broker_user)
    except ValueError as exc:  # --broker-user names no user
        return [Check("running broker", FAIL, f"--broker-user: {exc}", "the broker's confinement was not checked")]
    except errors.ShmBrokerError as exc:
        return [Check("running broker", FAIL, f"could not query its status: {exc}",
                      "query it as root or as a member of its operator group ([broker] operator_group)")]
    confinement: dict[str, Any] | None = status.get("confinement")
    where = status["broker"]["socket"]
    if confinement is None:
        return [Check("running broker", WARN, f"the broker at {where} does not report its confinement (an older version)")]
    found = problems(confinement)
    landlock = confinement["landlock"]
    summary = (
        f"{where}: pid {status['broker']['pid']}, user {confinement['user']['name']}, "
        f"Landlock {landlock['state']}" + (f" (ABI {landlock['abi']}, {landlock['rules']} rules)" if landlock["state"] == "enforced" else "")
        + f", seccomp {confinement['seccomp']['mode_name']}, caps {', '.join(confinement['capabilities']['effective']) or 'none'}"
    )
    if not found:
        return [Check("running broker", OK, summary)]
    worst = FAIL if any(severity == FAIL for severity, _ in found) else WARN
    return [Check("running broker", worst, summary, "; ".join(text for _, text in found))]


PROBES: list[Callable[[], Check]] = [
    check_leases, check_pidfd, check_landlock, check_memfd_seals, check_mlock, check_ptrace, check_coredumps, check_seccomp,
    check_ring_core,
]
