"""Attach latency: connect -> authenticated -> segment mapped, end to end.

    .venv/bin/python benchmarks/attach_latency.py [--samples 1000] [--clients 8] [--seconds 5]

Starts its own broker on a temporary socket, then measures
1. the latency of ShmClient.attach() + close() done one at a time (median, p99);
2. attaches per second with N client processes attaching and closing in a loop.
Each attach is a full session: hello, SO_PEERCRED/pidfd/exe checks, policy,
SCM_RIGHTS handoff, fstat checks, mmap.  A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shmbroker import ShmClient

CHANNEL = "bench"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _attach_loop(sock: str, seconds: float, start: float, out: "multiprocessing.Queue[int]") -> None:
    while time.time() < start:
        time.sleep(0.001)
    count = 0
    end = start + seconds
    while time.time() < end:
        ShmClient.attach(CHANNEL, "consumer", socket_path=sock).close()
        count += 1
    out.put(count)


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description="Measure shmbroker attach latency and attach rate.")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=1 << 20, help="segment size in bytes (default 1 MiB)")
    parser.add_argument("--landlock", choices=("auto", "on", "off"), default="auto", help="passed to `shmbroker serve`")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="shmb-bench-"))
    sock = str(tmp / "run" / "broker.sock")
    broker = subprocess.Popen(
        [sys.executable, "-m", "shmbroker", "serve", "--socket", sock, "--channel", f"{CHANNEL}:{args.size}",
         "--landlock", args.landlock],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                ShmClient.status(socket_path=sock)
                break
            except Exception:
                if time.monotonic() > deadline or broker.poll() is not None:
                    print("the broker did not start", file=sys.stderr)
                    return 1
                time.sleep(0.02)
        # A producer keeps the segment alive, so every sample maps the same
        # segment instead of also timing segment creation and wiping.
        holder = ShmClient.attach(CHANNEL, "producer", socket_path=sock)
        for _ in range(20):  # warm-up
            ShmClient.attach(CHANNEL, "consumer", socket_path=sock).close()
        samples = []
        for _ in range(args.samples):
            t0 = time.perf_counter_ns()
            att = ShmClient.attach(CHANNEL, "consumer", socket_path=sock)
            samples.append((time.perf_counter_ns() - t0) / 1000)
            att.close()

        ctx = multiprocessing.get_context("fork")
        out: multiprocessing.Queue[int] = ctx.Queue()
        start = time.time() + 0.5
        workers = [ctx.Process(target=_attach_loop, args=(sock, args.seconds, start, out)) for _ in range(args.clients)]
        for w in workers:
            w.start()
        total = sum(out.get(timeout=args.seconds + 60) for _ in workers)
        for w in workers:
            w.join()
        holder.close()

        print(f"machine: {cpu_model()}, {os.cpu_count()} cpus, Linux {platform.release()}, Python {platform.python_version()}")
        print(f"attach latency over {args.samples} attaches of a {args.size}-byte segment (connect to mapped, "
              f"--landlock {args.landlock}):")
        print(f"  median {statistics.median(samples):.0f} us, p99 {percentile(samples, 0.99):.0f} us, "
              f"min {min(samples):.0f} us, max {max(samples):.0f} us")
        print(f"attach rate with {args.clients} concurrent client processes for {args.seconds:g} s: "
              f"{total / args.seconds:.0f} attaches/s ({total} attaches)")
        return 0
    finally:
        broker.send_signal(signal.SIGTERM)
        try:
            broker.wait(15)
        except subprocess.TimeoutExpired:
            broker.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
