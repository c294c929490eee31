#!/usr/bin/env python3
"""Wake-up latency from sleep (a script, not a test): how long after a
send a consumer asleep in the kernel has the message, against the kernel's
own floor measured in the same run.

    .venv/bin/python benchmarks/wakeup_bench.py [--rounds N] [--trials N]

One-way, one message per round, 2 ms between rounds so the receiver has
stopped spinning and sleeps (the ring spins 50 us first, waiting.py).  The
sender stamps time.perf_counter() (CLOCK_MONOTONIC, the same clock in every
process) just before it sends; the receiver reads it just after the message
is in hand.  Mechanisms, alternating trial by trial:

* ring: ``send`` of 64 B to a consumer asleep in ``recv``;
* eventfd: ``os.eventfd_write`` to a process asleep in ``select``, which then
  reads the counter (what the ring's sleep rests on);
* futex: FUTEX_WAKE on a shared word a process waits on with FUTEX_WAIT
  (ctypes), the alternative for the sync path.

Prints p50 and p99 of each in microseconds and the ring's p50 over the
eventfd p50.
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
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ring_bench import fork  # this directory: run as benchmarks/wakeup_bench.py
from shmbroker import ShmClient

GAP = 0.002
STAMP = struct.Struct("<d")
SYS_FUTEX = {"x86_64": 202, "aarch64": 98}


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


def collect(results_r: int, rounds: int) -> list[float]:
    data = b""
    while len(data) < rounds * 8:
        chunk = os.read(results_r, 65536)
        if not chunk:
            break
        data += chunk
    return [x for (x,) in struct.iter_unpack("<d", data)]


def ring(sock: str, rounds: int, trial: int) -> list[float]:
    name = f"wake-{trial}"
    p = ShmClient.attach(name, "producer", socket_path=sock, size=64 * 1024, ring=True, max_message=64)
    ready_r, ready_w = os.pipe()
    results_r, results_w = os.pipe()

    def consumer() -> None:
        out = []
        with ShmClient.attach(name, "consumer", socket_path=sock) as c:
            os.write(ready_w, b"x")
            for _ in range(rounds):
                msg = c.recv()
                out.append(time.perf_counter() - STAMP.unpack_from(msg)[0])
        os.write(results_w, b"".join(STAMP.pack(x) for x in out))

    pid = fork(consumer)
    os.read(ready_r, 1)
    pad = bytes(64 - STAMP.size)
    for _ in range(rounds):
        time.sleep(GAP)
        p.send(STAMP.pack(time.perf_counter()) + pad)
    samples = collect(results_r, rounds)
    os.waitpid(pid, 0)
    p.close()
    for fd in (ready_r, ready_w, results_r, results_w):
        os.close(fd)
    return samples


def eventfd(rounds: int) -> list[float]:
    efd = os.eventfd(0)
    page = mmap.mmap(-1, mmap.PAGESIZE)
    results_r, results_w = os.pipe()

    def sleeper() -> None:
        out = []
        for _ in range(rounds):
            select.select([efd], [], [])
            os.eventfd_read(efd)
            out.append(time.perf_counter() - STAMP.unpack_from(page)[0])
        os.write(results_w, b"".join(STAMP.pack(x) for x in out))

    pid = fork(sleeper)
    for _ in range(rounds):
        time.sleep(GAP)
        STAMP.pack_into(page, 0, time.perf_counter())
        os.eventfd_write(efd, 1)
    samples = collect(results_r, rounds)
    os.waitpid(pid, 0)
    for fd in (efd, results_r, results_w):
        os.close(fd)
    page.close()
    return samples


def futex(rounds: int) -> list[float] | None:
    number = SYS_FUTEX.get(platform.machine())
    if number is None:
        return None
    syscall = ctypes.CDLL(None, use_errno=True).syscall
    page = mmap.mmap(-1, mmap.PAGESIZE)
    word = ctypes.c_uint32.from_buffer(page, 8)
    addr = ctypes.c_void_p(ctypes.addressof(word))
    results_r, results_w = os.pipe()

    def sleeper() -> None:
        out = []
        for i in range(rounds):
            while word.value == i:
                syscall(number, addr, 0, i, None, None, 0)  # FUTEX_WAIT (shared)
            out.append(time.perf_counter() - STAMP.unpack_from(page)[0])
        os.write(results_w, b"".join(STAMP.pack(x) for x in out))

    pid = fork(sleeper)
    for i in range(rounds):
        time.sleep(GAP)
        STAMP.pack_into(page, 0, time.perf_counter())
        word.value = i + 1
        syscall(number, addr, 1, 1, None, None, 0)  # FUTEX_WAKE one
    samples = collect(results_r, rounds)
    os.waitpid(pid, 0)
    for fd in (results_r, results_w):
        os.close(fd)
    del word
    page.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shmb-wake-", dir="/tmp"))
    sock = str(tmp / "run" / "broker.sock")
    proc = subprocess.Popen([sys.executable, "-m", "shmbroker", "serve", "--socket", sock],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.01)
        got: dict[str, list[float]] = {"ring": [], "eventfd": [], "futex": []}
        for trial in range(args.trials):
            got["ring"] += ring(sock, args.rounds, trial)
            got["eventfd"] += eventfd(args.rounds)
            f = futex(args.rounds)
            if f is not None:
                got["futex"] += f
        print(f"# wake-up from sleep, one-way, {args.trials} x {args.rounds} rounds {GAP * 1e3:g} ms apart, "
              f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}")
        p50s = {}
        for name, samples in got.items():
            if samples:
                p50, p99 = percentiles(samples)
                p50s[name] = p50
                print(f"{name:>8}: p50 {p50:7.1f} us  p99 {p99:8.1f} us")
        print(f"ring / eventfd p50: {p50s['ring'] / p50s['eventfd']:.2f}"
              + (f"; futex / eventfd p50: {p50s['futex'] / p50s['eventfd']:.2f}" if "futex" in p50s else ""))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
