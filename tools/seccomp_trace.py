#!/usr/bin/env python3
"""Build the broker's seccomp allowlist by tracing a real broker under strace.

    .venv/bin/python tools/seccomp_trace.py            # rewrite the allowlist
    .venv/bin/python tools/seccomp_trace.py --check    # exit 1 if it is stale

How (docs/hardening.md, "seccomp"):
1. start `shmbroker serve --seccomp log --landlock on` under `strace -f`, with
   NOTIFY_SOCKET/WATCHDOG_USEC set and a config with a liveness rule;
2. drive every code path a serving broker takes: attach (producer,
   consumer, on-demand creation), status, detach, a refused peer, a
   malformed frame, a peer sending an fd, an immediate hang-up, a liveness
   wipe, SIGUSR1 panic, SIGHUP, watchdog pings, SIGTERM shutdown;
3. keep the syscalls the broker's main process made *after* it logged
   "seccomp filter installed" (startup happens before the filter exists,
   and the exe inspector is forked before it, so neither needs the list);
4. add MARGIN: calls CPython or glibc make only in rarer moments (heap
   growth, a lazily imported module, a traceback) that one run may miss;
5. map names to x86-64 numbers from <asm/unistd_64.h> and write
   shmbroker/_sys/seccomp_allowlist.py.
"""

from __future__ import annotations

import argparse
import array
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shmbroker import ShmClient, errors  # noqa: E402

OUTPUT = ROOT / "shmbroker" / "_sys" / "seccomp_allowlist.py"
UNISTD = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
MARKER = "seccomp filter installed"

# Calls a long-running CPython/glibc process makes only occasionally.  Each
# is harmless for the broker's threat model (no exec, no new privileges, no
# new mappings of files by path, no namespaces, no ptrace).
MARGIN = {
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise",  # allocator growth and trimming
    "futex", "rt_sigreturn", "rt_sigaction", "rt_sigprocmask", "sigaltstack", "restart_syscall",
    "exit", "exit_group", "tgkill", "getpid", "gettid",  # exit, faulthandler, raise()
    "openat", "newfstatat", "fstat", "lseek", "read", "pread64", "readlink", "getdents64", "close", "ioctl",
    "getcwd", "statx",  # lazy imports and tracebacks (linecache)
    "getrandom", "clock_gettime", "clock_nanosleep", "write", "writev", "sendto", "sendmsg", "recvmsg",
    "epoll_wait", "epoll_pwait", "epoll_ctl", "fcntl", "pwrite64", "ftruncate",
    "memfd_create",  # the memfd segment backend (seals via fcntl)
    "fallocate",  # segment pages reserved up front; a punch when a wipe cannot write
    "eventfd2",  # the reserve fd traded for a connection when out of fds
}


def trace(workdir: Path) -> str:
    if shutil.which("strace") is None:
        sys.exit("strace is not installed (apt-get install strace)")
    sock = workdir / "run" / "broker.sock"
    notify = workdir / "notify.sock"
    config = workdir / "broker.toml"
    config.write_text(
        f'[channels.live]\nsize = "64KiB"\nwipe_when = "producer_gone"\n\n'
        f'[channels.sealed]\nsize = "64KiB"\nbackend = "memfd"\n\n'
        f'[channels.messages]\nsize = "64KiB"\nring = true\n\n'
        f"[[rules]]\nuids = [{os.getuid()}]\ncreate = true\n\n[status]\nuids = [{os.getuid()}]\n"
    )
    out = workdir / "strace.out"
    log = open(workdir / "broker.log", "w")
    notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_sock.bind(str(notify))
    notify_sock.settimeout(0.5)
    # Play the service manager: read every message so the queue
    # (net.unix.max_dgram_qlen, often 10) never fills.
    threading.Thread(target=_drain, args=(notify_sock,), daemon=True).start()
    env = {**os.environ, "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "100000"}
    proc = subprocess.Popen(
        ["strace", "-f", "-qq", "-s", "256", "-o", str(out), sys.executable, "-m", "shmbroker", "serve", "--socket", str(sock),
         "--config", str(config), "--seccomp", "log", "--landlock", "on", "-v"],
        stderr=log, stdout=subprocess.DEVNULL, env=env, cwd=ROOT,
    )
    broker_pid = None
    try:
        broker_pid = _exercise(str(sock), proc)
    finally:
        # Signal the broker itself: proc is strace, which would detach on
        # SIGTERM and leave the broker running.
        for pid in [broker_pid] if broker_pid else _children(proc.pid):
            os.kill(pid, signal.SIGTERM)
        proc.wait(30)
        notify_sock.close()
    if MARKER not in (workdir / "broker.log").read_text():
        sys.exit(f"the broker never installed its filter; log:\n{(workdir / 'broker.log').read_text()}")
    return out.read_text()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _drain(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            return


def _exercise(sock: str, proc: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 30
    while True:
        try:
            pid = int(ShmClient.status(socket_path=sock)["broker"]["pid"])
            break
        except errors.ShmBrokerError:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("the traced broker did not start")
            time.sleep(0.1)
    for _ in range(2):
        with ShmClient.attach("demand", "producer", socket_path=sock, size=8192) as p, \
             ShmClient.attach("demand", "consumer", socket_path=sock) as c:
            p.buf[:4] = b"ping"
            assert bytes(c.buf[:4]) == b"ping"
            ShmClient.status(socket_path=sock)
    with ShmClient.attach("sealed", "producer", socket_path=sock) as p:
        p.buf[:4] = b"seal"
    # Ring channels: slots, eventfds, wake-ups, and a consumer leaving.
    with ShmClient.attach("messages", "producer", socket_path=sock) as p, \
         ShmClient.attach("messages", "consumer", socket_path=sock) as c:
        p.send(b"ping")
        assert c.recv(timeout=5) == b"ping"
        ShmClient.attach("messages", "consumer", socket_path=sock).close()
    with ShmClient.attach("demand-ring", "producer", socket_path=sock, size=65536, ring=True) as p:
        p.send(b"kept for the first consumer")
    consumer = ShmClient.attach("live", "consumer", socket_path=sock)
    producer = ShmClient.attach("live", "producer", socket_path=sock)
    producer.close()  # liveness wipe
    ShmClient.status(socket_path=sock)
    consumer.close()
    for bad in (b"\xff" * 64, b""):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(sock)
            if bad:
                s.send(bad)
            time.sleep(0.05)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # a peer passing an fd
        s.connect(sock)
        fd = os.open(os.devnull, os.O_RDONLY)
        s.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        os.close(fd)
        time.sleep(0.05)
    try:
        ShmClient.attach("nope", "consumer", socket_path=sock)
    except errors.ChannelNotFound:
        pass
    held = ShmClient.attach("panic", "producer", socket_path=sock, size=4096)
    os.kill(pid, signal.SIGUSR1)
    time.sleep(0.2)
    held.close()
    os.kill(pid, signal.SIGHUP)
    time.sleep(1.5)  # watchdog pings and an idle tick
    return pid


_LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. (\w+) resumed>|(\w+)\()")


def syscalls_after_marker(text: str) -> set[str]:
    lines = text.splitlines()
    marker_pid, start = None, None
    for i, line in enumerate(lines):
        if MARKER in line and " write(" in line:
            marker_pid, start = line.split()[0], i
            break
    if marker_pid is None or start is None:
        sys.exit("marker not found in the strace output")
    names = set()
    for line in lines[start:]:
        m = _LINE.match(line)
        if m and m.group(1) == marker_pid:
            names.add(m.group(2) or m.group(3))
    return names


def numbers() -> dict[str, int]:
    if not UNISTD.exists():
        sys.exit(f"{UNISTD} is missing (apt-get install linux-libc-dev)")
    table = {}
    for m in re.finditer(r"#define __NR_(\w+) (\d+)", UNISTD.read_text()):
        table[m.group(1)] = int(m.group(2))
    return table


def render(traced: set[str], table: dict[str, int]) -> str:
    names = sorted(traced | MARGIN)
    unknown = [n for n in names if n not in table]
    if unknown:
        sys.exit(f"not x86-64 syscalls: {unknown}")
    body = "\n".join(
        f'    "{n}": {table[n]},{"" if n in traced else "  # margin"}' for n in names
    )
    return (
        '"""The broker\'s syscall allowlist: generated by tools/seccomp_trace.py, do not edit.\n\n'
        "Traced from a serving broker under strace -f (see docs/hardening.md); entries marked\n"
        '"margin" were added for rarer CPython paths rather than seen in the trace.\n"""\n\n'
        f"X86_64: dict[str, int] = {{\n{body}\n}}\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if tracing finds a syscall the list lacks")
    args = parser.parse_args()
    keep = os.environ.get("SECCOMP_TRACE_KEEP")
    with tempfile.TemporaryDirectory(prefix="shmb-trace-", dir="/tmp") as tmp:
        if keep:
            tmp = keep
        traced = syscalls_after_marker(trace(Path(tmp)))
    table = numbers()
    if args.check:
        from shmbroker._sys.seccomp_allowlist import X86_64

        missing = sorted(traced - set(X86_64))
        if missing:
            print(f"allowlist lacks: {', '.join(missing)}; rerun tools/seccomp_trace.py")
            return 1
        print(f"allowlist covers all {len(traced)} traced syscalls")
        return 0
    OUTPUT.write_text(render(traced, table))
    print(f"{len(traced)} traced + margin -> {OUTPUT.relative_to(ROOT)}")
    print("traced:", " ".join(sorted(traced)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
