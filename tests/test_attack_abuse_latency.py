"""One uid's abuse must not stall another uid (issue 12, points 3 and 5; docs/attacks.md, A8).

The broker used to handle every request of a 64 KiB read at once and to
zero whole segments inside its loop, so one uid pipelining refused requests,
or creating and dropping large channels, pushed everyone else's attach from
milliseconds to seconds.  Work is now scheduled per uid (scheduler.py) and
segment work is done in small steps.

Not a benchmark: the bound is loose (the slowest attach under abuse within
10x the unloaded median of the same test, or 50 ms, whichever is larger) so
it holds on a noisy machine while the old broker misses it by an order of
magnitude: a stall shows in the slowest attach even when most attaches slip
in between two stalls.  benchmarks/abuse_latency.py measures the real
ratios; docs/attacks.md quotes them.
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from adversary import churn_large_channels, pipeline_refused_status, policy_toml, write_config
from helpers import NOBODY
from shmbroker import ShmClient

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the abuser runs as another uid")

SAMPLES = 60
BOUND = 10.0
FLOOR = 0.05
# Requests per write: one 64 KiB read of the broker holds about this many.
BURST = 5000


def _broker(broker_factory: Any, tmp: Path) -> Any:
    # Root and nobody may attach (and create) anything; only root may ask for status.
    config = policy_toml(uids=(0, NOBODY), executables=None, socket_group=NOBODY)
    return broker_factory("--config", write_config(tmp, config))


def _victim(path: str) -> list[float]:
    times = []
    for _ in range(SAMPLES):
        start = time.perf_counter()
        ShmClient.attach("victim", "consumer", socket_path=path, timeout=30).close()
        times.append(time.perf_counter() - start)
    return times


def _abuser(body: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            body()
        finally:
            os._exit(0)
    return pid


def _assert_not_stalled(broker: Any, body: Callable[[], None]) -> None:
    holder = ShmClient.attach("victim", size=1 << 20, socket_path=broker.socket)
    try:
        baseline = statistics.median(_victim(broker.socket))
        pid = _abuser(body)
        try:
            time.sleep(0.5)
            loaded = _victim(broker.socket)
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    finally:
        holder.close()
    worst = max(loaded)
    assert worst <= max(BOUND * baseline, FLOOR), (
        f"slowest victim attach {worst * 1e3:.1f} ms under abuse (median {statistics.median(loaded) * 1e3:.1f} ms); "
        f"unloaded median {baseline * 1e3:.1f} ms"
    )
    assert broker.proc.poll() is None


def test_refused_requests_pipelined_by_one_uid_do_not_slow_another_uid(broker_factory: Any, short_tmp: Path) -> None:
    """Nobody may not ask for status: each of its pipelined requests is refused."""
    broker = _broker(broker_factory, short_tmp)
    _assert_not_stalled(broker, lambda: pipeline_refused_status(broker.socket, connections=4, burst=BURST))


def test_creating_and_dropping_large_channels_does_not_stall_other_peers(broker_factory: Any, short_tmp: Path) -> None:
    broker = _broker(broker_factory, short_tmp)
    _assert_not_stalled(broker, lambda: churn_large_channels(broker.socket, size=1 << 30))
