"""One peer at one message size: throughput, CPU per message, latency."""

from __future__ import annotations

import dataclasses
from typing import Any

from . import workloads
from .peers.base import Lane, Peer
from .runner import BenchError, WorkerGroup
from .stats import summarize_ns

# Time allowed for a measurement beyond its own planned length: the
# machine may be loaded, but a peer that stalls this long is broken.
STALL_ALLOWANCE = 60.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much work each measurement does (derived from the command line)."""

    lanes: int  # producer/consumer pairs running at once
    messages: int  # per producer; 0 means run for duration_s
    duration_s: float
    pingpong: int  # round trips timed
    warmup: int  # round trips before timing starts

    def messages_for(self, size: int, byte_budget: int, floor: int) -> int:
        if not self.messages:
            return 0
        return max(floor, min(self.messages, byte_budget // size))


def _close_lanes(lanes: list[Lane]) -> None:
    for lane in lanes:
        lane.close()


def throughput(peer: Peer, size: int, lanes: int, messages: int, duration_s: float) -> dict[str, Any]:
    made = [peer.lane(size, i) for i in range(lanes)]
    group = WorkerGroup(timeout=duration_s + STALL_ALLOWANCE)
    try:
        # Consumers first, so a peer whose producer connects to the consumer finds it.
        for i, lane in enumerate(made):
            group.spawn(f"{peer.name} consumer {i}", workloads.stream_consumer, lane, size)
        for i, lane in enumerate(made):
            group.spawn(f"{peer.name} producer {i}", workloads.stream_producer, lane, size, messages, int(duration_s * 1e9))
        helper0 = peer.helper_cpu_seconds()
        results = group.run()
        helper1 = peer.helper_cpu_seconds()
    finally:
        _close_lanes(made)
    consumers, producers = results[:lanes], results[lanes:]
    for i, (c, p) in enumerate(zip(consumers, producers)):
        if c["received"] != p["sent"]:
            raise BenchError(f"lane {i}: {p['sent']} messages sent but {c['received']} delivered")
    delivered = sum(c["received"] for c in consumers)
    elapsed_ns = max(c["t_end"] for c in consumers) - min(p["t_start"] for p in producers)
    if delivered == 0 or elapsed_ns <= 0:
        raise BenchError("no message was delivered: the measurement is too short for this machine")
    seconds = elapsed_ns / 1e9
    producer_cpu = sum(p["cpu_s"] for p in producers)
    consumer_cpu = sum(c["cpu_s"] for c in consumers)
    figures = {
        "messages": delivered,
        "seconds": seconds,
        "msgs_per_s": delivered / seconds,
        "mb_per_s": delivered * size / seconds / 1e6,
        "cpu_s_per_msg": (producer_cpu + consumer_cpu) / delivered,
        "producer_cpu_s_per_msg": producer_cpu / delivered,
        "consumer_cpu_s_per_msg": consumer_cpu / delivered,
    }
    if helper0 is not None and helper1 is not None:
        # Clock-tick resolution and includes the workers' setup: an upper bound.
        # It may be 0, so it is only in the total, never a figure of its own
        # that the schema promises positive.
        figures["cpu_s_per_msg"] += (helper1 - helper0) / delivered
        figures["helper_cpu_s"] = helper1 - helper0
    return figures


def latency(peer: Peer, size: int, samples: int, warmup: int) -> dict[str, Any]:
    fwd, back = peer.lane(size, 0), peer.lane(size, 1)
    group = WorkerGroup(timeout=STALL_ALLOWANCE)
    try:
        group.spawn(f"{peer.name} echo", workloads.echo, fwd, back, size, warmup)
        group.spawn(f"{peer.name} pinger", workloads.pinger, fwd, back, size, samples, warmup)
        echo, ping = group.run()
    finally:
        _close_lanes([fwd, back])
    return {
        "one_way_us": summarize_ns(workloads.samples(echo["oneway_ns"])),
        "round_trip_us": summarize_ns(workloads.samples(ping["rtt_ns"])),
    }
