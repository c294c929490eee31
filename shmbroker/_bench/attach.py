"""Attach cost: one client's connect-to-mapped latency (attaching to an
existing channel, and creating one) beside the floor of a bare authenticated
fd handoff measured in the same run (handoff.py), and the broker's attach
rate when many clients attach and close at once.

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


def _timed_attaches(ready: Ready, count: int, size: int, attach: Any) -> None:
    """Time ``attach(i)`` (connect to mapped) ``count`` times, closing each.

    One untimed attach first: imports and first-touch page faults are
    start-up costs, not what a long-running client pays per attach."""
    attach(-1).close()
    ready()
    times = array("q")
    for i in range(count):
        t0 = time.perf_counter_ns()
        att = attach(i)
        t1 = time.perf_counter_ns()
        if len(att.buf) != size:
            raise BenchError(f"mapped a {len(att.buf)}-byte segment, expected {size}")
        att.close()
        times.append(t1 - t0)
    ready.report({"attach_ns": times.tobytes()})


def _attach_loop(ready: Ready, socket_path: str, count: int, size: int) -> None:
    from .. import ShmClient

    _timed_attaches(ready, count, size, lambda i: ShmClient.attach(CHANNEL, "consumer", socket_path=socket_path))


def _floor_loop(ready: Ready, socket_path: str, count: int, size: int) -> None:
    """The bare authenticated fd handoff (handoff.py), timed the same way."""
    from pathlib import Path

    from .handoff import BareServer

    server = BareServer(Path(socket_path).parent, size)
    try:
        _timed_attaches(ready, count, size, lambda i: server.attach())
    finally:
        server.stop()


def _create_loop(ready: Ready, socket_path: str, count: int, size: int) -> None:
    """A producer creating a fresh channel each time: segment creation, lease and all.

    On-demand channels go away when their last peer detaches, so the broker
    never holds more than one of these at a time."""
    from .. import ShmClient

    _timed_attaches(
        ready, count, size,
        lambda i: ShmClient.attach(f"bench-create-{i + 1}", "producer", socket_path=socket_path, size=size),
    )


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
    def __init__(self, directory: Path, *, size: int = CHANNEL_SIZE, serve_args: tuple[str, ...] = ()) -> None:
        directory.mkdir(mode=0o700)
        self.size = size
        self.broker = TempBroker(directory, "--channel", f"{CHANNEL}:{size}", *serve_args)

    def stop(self) -> None:
        self.broker.stop()

    def _holder(self) -> Any:
        """A producer holding the channel while consumers come and go, so a
        join maps a live segment; without it the first join would also create
        the segment and the last close wipe it."""
        from .. import ShmClient

        return ShmClient.attach(CHANNEL, "producer", socket_path=self.broker.socket)

    def latency(self, count: int) -> dict[str, Any]:
        """Consumer attach to an existing channel, then producer attach creating one."""
        from .workloads import samples

        figures: dict[str, Any] = {"attaches": count}
        for key, fn in (("floor_us", _floor_loop), ("latency_us", _attach_loop), ("create_latency_us", _create_loop)):
            holder = self._holder() if fn is _attach_loop else None
            try:
                group = WorkerGroup(timeout=STALL_ALLOWANCE)
                group.spawn("attach client", fn, self.broker.socket, count, self.size)
                (result,) = group.run()
            finally:
                if holder is not None:
                    holder.close()
            figures[key] = summarize_ns(samples(result["attach_ns"]))
        figures["ratio_to_floor"] = figures["latency_us"]["p50"] / figures["floor_us"]["p50"]
        return figures

    def rate(self, clients: int, seconds: float) -> dict[str, Any]:
        group = WorkerGroup(timeout=seconds + STALL_ALLOWANCE)
        for i in range(clients):
            group.spawn(f"attach client {i}", _churn, self.broker.socket, seconds)
        with self._holder():
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
