"""Load (long target): many concurrent clients attach, exchange and detach
in a loop.  The broker's RSS and fd count stay flat, and every attach
either succeeds or gets a clear limit error.

SHMBROKER_LOAD_CLIENTS (default 1000) and SHMBROKER_LOAD_SECONDS (60) tune it."""

from __future__ import annotations

import collections
import os
import pickle
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from adversary import policy_toml, stable_fd_count, wait_fd_baseline, write_config
from helpers import fd_count
from shmbroker import ShmClient, errors

CLIENTS = int(os.environ.get("SHMBROKER_LOAD_CLIENTS", "1000"))
SECONDS = float(os.environ.get("SHMBROKER_LOAD_SECONDS", "60"))
PROCESSES = 4
CHANNELS = 16


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _client_process(socket_path: str, threads: int, end: float, seed: int) -> dict[str, Any]:
    results: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def worker(n: int) -> None:
        rng = random.Random(seed * 100000 + n)
        local: collections.Counter[str] = collections.Counter()
        while time.monotonic() < end:
            channel = f"load{rng.randrange(CHANNELS)}"
            try:
                with ShmClient.attach(channel, size=65536, socket_path=socket_path, timeout=60) as att:
                    stamp = rng.randbytes(8)
                    att.buf[n * 8 % 65536 : n * 8 % 65536 + 8] = stamp
                    assert bytes(att.buf[n * 8 % 65536 : n * 8 % 65536 + 8]) == stamp
                    time.sleep(rng.uniform(0.2, 1.0))  # hold it: that is the concurrency
                local["ok"] += 1
            except errors.LimitExceeded as exc:
                local["limit: " + str(exc).split(";")[0][:60]] += 1
                time.sleep(0.05)
            except Exception as exc:
                local[f"other: {type(exc).__name__}: {exc}"[:160]] += 1
        with lock:
            results.update(local)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return dict(results)


@pytest.mark.long
def test_load_concurrent_clients(broker_factory: Any, short_tmp: Path) -> None:
    limits = {"max_connections_per_uid": CLIENTS + 64, "max_connections": CLIENTS + 128}
    broker = broker_factory("--config", write_config(short_tmp, policy_toml(limits=limits)))
    baseline_fds = stable_fd_count(broker.pid)
    start_rss = rss_kib(broker.pid)
    end = time.monotonic() + SECONDS
    children = []
    for p in range(PROCESSES):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                out = _client_process(broker.socket, CLIENTS // PROCESSES, end, p)
            except BaseException as exc:
                out = {f"crash: {exc!r}": 1}
            with os.fdopen(w, "wb") as f:
                pickle.dump(out, f)
            os._exit(0)
        os.close(w)
        children.append((pid, r))
    samples = []
    while time.monotonic() < end:
        samples.append((time.monotonic(), rss_kib(broker.pid), fd_count(broker.pid)))
        time.sleep(1)
    total: collections.Counter[str] = collections.Counter()
    for pid, r in children:
        with os.fdopen(r, "rb") as f:
            total.update(pickle.load(f))
        os.waitpid(pid, 0)
    wait_fd_baseline(broker.pid, baseline_fds, timeout=60)
    end_rss = rss_kib(broker.pid)
    peak_fds = max(s[2] for s in samples)
    warm = [s[1] for s in samples[len(samples) // 4 : len(samples) // 2]] or [start_rss]
    late = [s[1] for s in samples[len(samples) // 2 :]] or [end_rss]
    print(
        f"\nload: {CLIENTS} clients for {SECONDS:g}s: {dict(total)}; broker RSS {start_rss} KiB at start, "
        f"{max(warm)} KiB warm, {max(late)} KiB peak late, {end_rss} KiB after; fds {baseline_fds} "
        f"baseline, {peak_fds} peak, back to {fd_count(broker.pid)}"
    )
    others = {k: v for k, v in total.items() if not (k == "ok" or k.startswith("limit: "))}
    assert not others, f"attaches failed without a clear limit error: {others}"
    assert total["ok"] > CLIENTS
    # Flat: no growth between the warm part of the run and its end beyond noise.
    assert max(late) <= max(warm) + 8 * 1024, (warm, late)
    assert peak_fds >= baseline_fds + CLIENTS, "the clients never reached the intended concurrency"
    assert broker.status()["connections"] <= 2
