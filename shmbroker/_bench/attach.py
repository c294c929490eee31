"""Attach cost: one client's connect-to-mapped latency (attaching to an
existing channel, and creating one), and the broker's attach rate when many
clients attach and close at once.

Uses only the core API (ShmClient.attach and Attachment.close) against a
private broker with one predeclared channel; every client is its own process.
"""

from __future__ import annotations

import time
from array import array
from pathlib import Path
from typing import Any

from .broker import TempBroker
from .runner import BenchError, Ready, WorkerGroup
from .stats import summarize_ns

CHANNEL = "bench-attach"
CHANNEL_SIZE = 64 * 1024
STALL_ALLOWANCE = 60.0


def _attach_loop(ready: Ready, socket_path: str, count: int) -> None:
    from .. import ShmClient

    # Connect once before timing: imports and first-touch page faults are
    # start-up costs, not what a long-running client pays per attach.
    ShmClient.attach(CHANNEL, "consumer", socket_path=socket_path).close()
    ready()
    times = array("q")
    for _ in range(count):
        t0 = time.perf_counter_ns()
        att = ShmClient.attach(CHANNEL, "consumer", socket_path=socket_path)
        t1 = time.perf_counter_ns()
        if len(att.buf) != CHANNEL_SIZE:
            raise BenchError(f"attached a {len(att.buf)}-byte segment, expected {CHANNEL_SIZE}")
        att.close()
        times.append(t1 - t0)
    ready.report({"attach_ns": times.tobytes()})


def _create_loop(ready: Ready, socket_path: str, count: int) -> None:
    """A producer creating a fresh channel each time: segment creation, lease and all."""
    from .. import ShmClient

    ShmClient.attach("bench-create-warm", "producer", socket_path=socket_path, size=CHANNEL_SIZE).close()
    ready()
    times = array("q")
    for i in range(count):
        t0 = time.perf_counter_ns()
        # On-demand channels go away when their last peer detaches, so the
        # broker never holds more than one of these at a time.
        att = ShmClient.attach(f"bench-create-{i}", "producer", socket_path=socket_path, size=CHANNEL_SIZE)
        t1 = time.perf_counter_ns()
        if len(att.buf) != CHANNEL_SIZE:
            raise BenchError(f"created a {len(att.buf)}-byte segment, expected {CHANNEL_SIZE}")
        att.close()
        times.append(t1 - t0)
    ready.report({"attach_ns": times.tobytes()})


def _churn(ready: Ready, socket_path: str, seconds: float) -> None:
    from .. import ShmClient

    ShmClient.attach(CHANNEL, "consumer", socket_path=socket_path).close()
    ready()
    start = time.perf_counter_ns()
    end = start + int(seconds * 1e9)
    done = 0
    while True:
        att = ShmClient.attach(CHANNEL, "consumer", socket_path=socket_path)
        att.close()
        done += 1
        t = time.perf_counter_ns()
        if t >= end:
            break
    ready.report({"attaches": done, "t_start": start, "t_end": t})


class AttachBench:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o700)
        self.broker = TempBroker(directory, "--channel", f"{CHANNEL}:{CHANNEL_SIZE}")

    def stop(self) -> None:
        self.broker.stop()

    def latency(self, count: int) -> dict[str, Any]:
        """Consumer attach to an existing channel, then producer attach creating one."""
        from .. import ShmClient
        from .workloads import samples

        figures: dict[str, Any] = {"attaches": count}
        for key, fn in (("latency_us", _attach_loop), ("create_latency_us", _create_loop)):
            # A producer holds the channel while consumers come and go, so the
            # join figure maps a live segment; without it every join would
            # also create a segment and every close wipe it.
            holder = ShmClient.attach(CHANNEL, "producer", socket_path=self.broker.socket) if fn is _attach_loop else None
            try:
                group = WorkerGroup(timeout=STALL_ALLOWANCE)
                group.spawn("attach client", fn, self.broker.socket, count)
                (result,) = group.run()
            finally:
                if holder is not None:
                    holder.close()
            figures[key] = summarize_ns(samples(result["attach_ns"]))
        return figures

    def rate(self, clients: int, seconds: float) -> dict[str, Any]:
        group = WorkerGroup(timeout=seconds + STALL_ALLOWANCE)
        for i in range(clients):
            group.spawn(f"attach client {i}", _churn, self.broker.socket, seconds)
        cpu0 = self.broker.cpu_seconds()
        results = group.run()
        broker_cpu = self.broker.cpu_seconds() - cpu0
        total = sum(r["attaches"] for r in results)
        elapsed = (max(r["t_end"] for r in results) - min(r["t_start"] for r in results)) / 1e9
        if total == 0 or elapsed <= 0:
            raise BenchError("no attach completed")
        return {
            "clients": clients,
            "seconds": elapsed,
            "attaches": total,
            "attaches_per_s": total / elapsed,
            # Includes the harness waiting for workers to start: an upper bound.
            "broker_cpu_s_per_attach": broker_cpu / total,
        }
