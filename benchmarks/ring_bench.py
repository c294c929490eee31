#!/usr/bin/env python3
"""Ring channel benchmark (a script, not a test): one producer -> one consumer
in separate processes, against an os.pipe and a single-process memcpy ceiling
measured in the same run.

    .venv/bin/python benchmarks/ring_bench.py [--quick] [--trials N] [--socket PATH]

Without --socket it starts a private broker in a temporary directory.
Throughput columns are medians of N alternating trials (5 by default);
"per trial" is the lowest and highest ring/iceoryx2 ratio of one trial.
iceoryx2 (the `bench` extra) is measured when it is installed: publisher
here, subscriber in a subprocess, blocking backpressure so nothing is lost.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from shmbroker import ShmClient
from shmbroker._bench import _remove_shm
from shmbroker._bench.peers.iox2 import _node

SIZES = [64, 4096, 64 * 1024, 1024 * 1024]
MiB = 1024 * 1024


def counts(size: int, quick: bool) -> tuple[int, int]:
    """(messages for throughput, round trips for latency), a tenth to half a second each."""
    n = {64: 400_000, 4096: 100_000, 65536: 20_000, MiB: 3000}[size]
    rtt = {64: 5000, 4096: 5000, 65536: 2000, MiB: 200}[size]
    return (n // 4, rtt // 4) if quick else (n, rtt)


def fork(fn: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    return pid


def ring_throughput(sock: str, size: int, n: int, batch: bool) -> float:
    name = f"bench-{size}-{int(batch)}"
    # A ring that fits in L2 keeps the copied bytes in cache (measured: 2x at 4 KiB).
    ring_size = max(256 * 1024, 8 * size)
    p = ShmClient.attach(name, "producer", socket_path=sock, size=ring_size, ring=True, max_message=size)
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()

    def consumer() -> None:
        with ShmClient.attach(name, "consumer", socket_path=sock) as c:
            os.write(ready_w, b"x")
            buf = bytearray(size)
            got = 0
            if batch:
                while got < n:
                    got += len(c.recv_many(256))
            else:
                recv_into = c.recv_into
                while got < n:
                    recv_into(buf)
                    got += 1
            os.write(done_w, b"x")

    pid = fork(consumer)
    os.read(ready_r, 1)
    msg = os.urandom(size)
    start = time.perf_counter()
    if batch:
        chunk = [msg] * 256
        sent = 0
        while sent < n:
            sent += p.send_many(chunk[: n - sent])
    else:
        send = p.send
        for _ in range(n):
            send(msg)
    os.read(done_r, 1)
    elapsed = time.perf_counter() - start
    os.waitpid(pid, 0)
    p.close()
    for fd in (ready_r, ready_w, done_r, done_w):
        os.close(fd)
    return n / elapsed


def pipe_throughput(size: int, n: int) -> float:
    r, w = os.pipe()
    frame = size.to_bytes(4, "little") + os.urandom(size)

    def reader() -> None:
        os.close(w)
        f = os.fdopen(r, "rb", buffering=1 << 20)
        buf = bytearray(size)
        view = memoryview(buf)
        for _ in range(n):
            length = int.from_bytes(f.read(4), "little")
            f.readinto(view[:length])
        os._exit(0)

    pid = fork(reader)
    os.close(r)
    start = time.perf_counter()
    write = os.write
    for _ in range(n):
        data = memoryview(frame)
        while data:
            data = data[write(w, data):]
    os.close(w)
    os.waitpid(pid, 0)
    return n / (time.perf_counter() - start)


def memcpy_ceiling(size: int, n: int) -> float:
    # bytearray to bytearray is one memmove; a bytes source would be copied
    # into a temporary bytearray first and halve the ceiling.
    src = bytearray(os.urandom(size))
    dst = bytearray(size)
    start = time.perf_counter()
    for _ in range(n):
        dst[:] = src
    return n / (time.perf_counter() - start)


def ring_rtt(sock: str, size: int, rounds: int, gap: float = 0.0) -> tuple[float, float]:
    """Round trip p50/p99 in us; with ``gap`` seconds between rounds both sides
    are asleep in poll(2) when a message arrives, so it includes two wake-ups."""
    ping, pong = f"ping-{size}-{gap}", f"pong-{size}-{gap}"
    ring_size = max(8 * MiB, 4 * size)
    p = ShmClient.attach(ping, "producer", socket_path=sock, size=ring_size, ring=True, max_message=size)
    ready_r, ready_w = os.pipe()

    def echo() -> None:
        with ShmClient.attach(ping, "consumer", socket_path=sock) as c, ShmClient.attach(
            pong, "producer", socket_path=sock, size=ring_size, ring=True, max_message=size
        ) as back:
            os.write(ready_w, b"x")
            for _ in range(rounds):
                with c.receive_view() as view:
                    back.send(view)

    pid = fork(echo)
    os.read(ready_r, 1)
    c = ShmClient.attach(pong, "consumer", socket_path=sock)
    msg = os.urandom(size)
    samples = []
    for _ in range(rounds):
        if gap:
            time.sleep(gap)
        t0 = time.perf_counter()
        p.send(msg)
        c.recv()
        samples.append(time.perf_counter() - t0)
    os.waitpid(pid, 0)
    c.close()
    p.close()
    os.close(ready_r)
    os.close(ready_w)
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


def eventfd_rtt(rounds: int, gap: float) -> tuple[float, float]:
    """Round trip p50/p99 in us of a bare eventfd ping-pong between two
    processes that sleep in poll(2): the kernel's own floor under the ring's
    "asleep" figures (no ring, no Python ring code)."""
    ping, pong = os.eventfd(0), os.eventfd(0)

    def echo() -> None:
        for _ in range(rounds):
            select.select([ping], [], [])
            os.eventfd_read(ping)
            os.eventfd_write(pong, 1)

    pid = fork(echo)
    samples = []
    for _ in range(rounds):
        time.sleep(gap)
        t0 = time.perf_counter()
        os.eventfd_write(ping, 1)
        select.select([pong], [], [])
        os.eventfd_read(pong)
        samples.append(time.perf_counter() - t0)
    os.waitpid(pid, 0)
    os.close(ping)
    os.close(pong)
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


# futex(2) numbers by machine (asm/unistd.h); FUTEX_WAIT and FUTEX_WAKE
# without FUTEX_PRIVATE_FLAG, since the word is shared between processes.
SYS_FUTEX = {"x86_64": 202, "aarch64": 98}
FUTEX_WAIT, FUTEX_WAKE = 0, 1


def futex_rtt(rounds: int, gap: float) -> tuple[float, float] | None:
    """The same ping-pong as eventfd_rtt on two futex words in a shared
    page (ctypes syscall(2), as a C core would issue it, plus ctypes' own
    cost): the alternative to eventfd + poll(2) for the sync path."""
    number = SYS_FUTEX.get(platform.machine())
    if number is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.mmap(-1, mmap.PAGESIZE)  # MAP_SHARED: the forked echo sees the same words
    words = (ctypes.c_uint32 * 2).from_buffer(page)
    ping_addr = ctypes.c_void_p(ctypes.addressof(words))
    pong_addr = ctypes.c_void_p(ctypes.addressof(words) + 4)
    syscall = libc.syscall

    def echo() -> None:
        for i in range(rounds):
            while words[0] == i:
                syscall(number, ping_addr, FUTEX_WAIT, i, None, None, 0)
            words[1] = i + 1
            syscall(number, pong_addr, FUTEX_WAKE, 1, None, None, 0)

    pid = fork(echo)
    samples = []
    for i in range(rounds):
        time.sleep(gap)
        t0 = time.perf_counter()
        words[0] = i + 1
        syscall(number, ping_addr, FUTEX_WAKE, 1, None, None, 0)
        while words[1] == i:
            syscall(number, pong_addr, FUTEX_WAIT, i, None, None, 0)
        samples.append(time.perf_counter() - t0)
    os.waitpid(pid, 0)
    del words
    page.close()
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


def _iox_service(iox2: object, name: str, depth: int, root: str, prefix: str) -> object:
    # A private root and prefix, as `shmbroker bench` uses: iceoryx2's
    # defaults leave a world-writable file in /dev/shm and a tree in /tmp.
    node = _node(Path(root), prefix)
    service = (
        node.service_builder(iox2.ServiceName.new(name))  # type: ignore[attr-defined]
        .publish_subscribe(iox2.Slice[ctypes.c_uint8])  # type: ignore[attr-defined]
        .enable_safe_overflow(False)
        .subscriber_max_buffer_size(depth)
        .history_size(0)
        .open_or_create()
    )
    return node, service


def iox_depth(size: int) -> int:
    """Subscriber queue depth: about as many bytes in flight as the ring holds (8 MiB at most)."""
    return max(4, min(256, 8 * MiB // size))


def iox_subscriber(name: str, size: int, n: int, root: str, prefix: str) -> None:
    """Subprocess side of the iceoryx2 run: receive n samples, copying each out."""
    import iceoryx2 as iox2

    depth = iox_depth(size)
    node, service = _iox_service(iox2, name, depth, root, prefix)
    sub = service.subscriber_builder().buffer_size(depth).create()
    print("ready", flush=True)
    deadline = time.monotonic() + 120
    got = 0
    # Copy each payload into one reused buffer, as the ring's recv_into does,
    # so neither side pays for a fresh allocation per message.
    buf = (ctypes.c_char * size)()
    while got < n and time.monotonic() < deadline:
        sample = sub.receive()
        if sample is None:
            continue
        ctypes.memmove(buf, sample.payload_ptr, size)
        sample.delete()
        got += 1
    print("done" if got == n else "timeout", flush=True)
    sub.delete()


def iox_throughput(size: int, n: int, root: str, prefix: str) -> float | None:
    try:
        import iceoryx2 as iox2
    except ImportError:
        return None
    iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
    name = f"shmbroker-bench-{os.getpid()}-{size}"
    node, service = _iox_service(iox2, name, iox_depth(size), root, prefix)
    pub = (
        service.publisher_builder()
        .initial_max_slice_len(size)
        .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
        .create()
    )
    child = subprocess.Popen(
        [sys.executable, __file__, "--iox-subscriber", name, str(size), str(n), root, prefix],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            return None
        time.sleep(0.2)  # let the subscriber's connection become visible to the publisher
        msg = os.urandom(size)
        start = time.perf_counter()
        for _ in range(n):
            sample = pub.loan_slice_uninit(size)
            ctypes.memmove(sample.payload_ptr, msg, size)
            sample.assume_init().send()
        ok = child.stdout.readline().strip() == "done"
        elapsed = time.perf_counter() - start
        return n / elapsed if ok else None
    finally:
        try:
            child.wait(130)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        pub.delete()


def start_broker() -> tuple[subprocess.Popen[bytes], str, str]:
    tmp = tempfile.mkdtemp(prefix="shmb-bench-", dir="/tmp")
    sock = os.path.join(tmp, "run", "broker.sock")
    proc = subprocess.Popen([sys.executable, "-m", "shmbroker", "serve", "--socket", sock], stderr=subprocess.DEVNULL)
    for _ in range(500):
        if os.path.exists(sock):
            try:
                ShmClient.status(socket_path=sock)
                return proc, sock, tmp
            except Exception:
                pass
        time.sleep(0.02)
    proc.kill()
    raise SystemExit("the broker did not start")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def human(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a quarter of the messages, one trial (noisier)")
    parser.add_argument("--trials", type=int, default=5, help="alternating trials per size; the table shows medians (default 5)")
    parser.add_argument("--socket", help="use a running broker instead of starting one")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated message sizes in bytes")
    parser.add_argument("--iox-subscriber", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.trials = 1
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    if args.iox_subscriber:
        name, size, n, root, prefix = args.iox_subscriber
        iox_subscriber(name, int(size), int(n), root, prefix)
        return
    proc = tmp = None
    sock = args.socket
    iox_root = tempfile.mkdtemp(prefix="shmb-bench-iox-", dir="/tmp")
    iox_prefix = f"shmbrb{os.getpid()}_"
    if sock is None:
        proc, sock, tmp = start_broker()
    try:
        print(f"# {cpu_model()}, {os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}, "
              f"medians of {args.trials} trial(s)")
        print(f"{'size':>7} {'ring msg/s':>11} {'ring MB/s':>10} {'batch msg/s':>12} {'pipe msg/s':>11} "
              f"{'pipe MB/s':>10} {'memcpy MB/s':>12} {'ring/pipe':>9} {'ring/memcpy':>11} {'rtt p50 us':>10} {'rtt p99 us':>10} {'asleep p50':>10} {'asleep p99':>10} {'iox2 msg/s':>11} {'ring/iox2':>8} {'per trial':>14}")
        for size in map(int, args.sizes.split(",")):
            n, rounds = counts(size, args.quick)
            # Trials alternate between the mechanisms, and the table reports
            # medians: on this VM one run of a cross-process copy can differ
            # from the next by 30% or more, for iceoryx2 as for the ring.
            trials: dict[str, list[float]] = {"ring": [], "batch": [], "pipe": [], "memcpy": [], "iox2": []}
            vs_iox: list[float] = []
            for _ in range(args.trials):
                trials["ring"].append(ring_throughput(sock, size, n, batch=False))
                trials["batch"].append(ring_throughput(sock, size, n, batch=True))
                trials["pipe"].append(pipe_throughput(size, n))
                trials["memcpy"].append(memcpy_ceiling(size, n))
                iox = iox_throughput(size, n, iox_root, iox_prefix)
                if iox is not None:
                    trials["iox2"].append(iox)
                    vs_iox.append(max(trials["ring"][-1], trials["batch"][-1]) / iox)
            ring, batch, pipe, ceiling = (statistics.median(trials[k]) for k in ("ring", "batch", "pipe", "memcpy"))
            iox_median = statistics.median(trials["iox2"]) if trials["iox2"] else None
            p50, p99 = ring_rtt(sock, size, rounds)
            w50, w99 = ring_rtt(sock, size, 200 if size < MiB else 50, gap=0.002)
            best = max(ring, batch)
            spread = f"{min(vs_iox):.2f}-{max(vs_iox):.2f}" if vs_iox else "n/a"
            print(f"{human(size):>7} {ring:>11,.0f} {ring * size / 1e6:>10,.0f} {batch:>12,.0f} {pipe:>11,.0f} "
                  f"{pipe * size / 1e6:>10,.0f} {ceiling * size / 1e6:>12,.0f} {best / pipe:>9.2f} "
                  f"{best / ceiling:>11.2f} {p50:>10.1f} {p99:>10.1f} {w50:>10.1f} {w99:>10.1f} "
                  f"{'n/a' if iox_median is None else format(iox_median, ',.0f'):>11} "
                  f"{'n/a' if iox_median is None else format(best / iox_median, '.2f'):>8} {spread:>14}",
                  flush=True)
        e50, e99 = eventfd_rtt(200, 0.002)
        print(f"# bare eventfd ping-pong between two processes asleep in poll(2), 2 ms apart: "
              f"RTT p50 {e50:.1f} us, p99 {e99:.1f} us (the floor under 'asleep')")
        futex = futex_rtt(200, 0.002)
        if futex is not None:
            print(f"# bare futex ping-pong (FUTEX_WAIT/FUTEX_WAKE on a shared page), 2 ms apart: "
                  f"RTT p50 {futex[0]:.1f} us, p99 {futex[1]:.1f} us")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(iox_root, ignore_errors=True)
        _remove_shm(iox_prefix)


if __name__ == "__main__":
    main()
