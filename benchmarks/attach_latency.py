"""Attach latency: connect -> authenticated -> segment mapped, end to end.

    .venv/bin/python benchmarks/attach_latency.py [--samples 1000] [--clients 8] [--seconds 5]
                                                  [--size BYTES] [--landlock auto|on|off]

The same measurement as the attach figures of `shmbroker bench`
(shmbroker/_bench/attach.py), with the segment size and the broker's Landlock
mode as knobs: a private broker, a producer holding the channel, then
1. the latency of ShmClient.attach() done one at a time by a client process
   joining the live channel (median, p99), and of a producer creating a channel;
2. attaches per second with N client processes attaching and closing in a loop.
Each attach is a full session: hello, SO_PEERCRED/pidfd/exe checks, policy,
SCM_RIGHTS handoff, fstat checks, mmap.  A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from shmbroker._bench.attach import AttachBench
from shmbroker._bench.machine import describe


def main() -> int:
    parser = argparse.ArgumentParser(description="Measure shmbroker attach latency and attach rate.")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=1 << 20, help="segment size in bytes (default 1 MiB)")
    parser.add_argument("--landlock", choices=("auto", "on", "off"), default="auto", help="passed to `shmbroker serve`")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="shmb-bench-"))
    bench = AttachBench(tmp / "broker", size=args.size, serve_args=("--landlock", args.landlock))
    try:
        latency = bench.latency(args.samples)
        rate = bench.rate(args.clients, args.seconds)
    finally:
        bench.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    join, create, floor = latency["latency_us"], latency["create_latency_us"], latency["floor_us"]
    m = describe()
    print(f"machine: {m['cpu_model']}, {m['cores']} cpus, Linux {m['kernel']}, Python {m['python']}, "
          f"load {' '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}")
    print(f"attach latency over {args.samples} attaches of a {args.size}-byte segment (connect to mapped, "
          f"--landlock {args.landlock}):")
    print(f"  joining a live channel: median {join['p50']:.0f} us, p99 {join['p99']:.0f} us, "
          f"min {join['min']:.0f} us, max {join['max']:.0f} us")
    print(f"  creating the channel:   median {create['p50']:.0f} us, p99 {create['p99']:.0f} us")
    print(f"  floor (a bare authenticated fd handoff, same run): median {floor['p50']:.0f} us; "
          f"joining is {latency['ratio_to_floor']:.2f}x the floor")
    print(f"attach rate with {rate['clients']} concurrent client processes for {rate['seconds']:.1f} s: "
          f"{rate['attaches_per_s']:.0f} attaches/s ({rate['attaches']} attaches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
