"""The table, ratios and plot render whatever was measured, partial runs included
(a failed latency figure once crashed a whole run's report)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from shmbroker._bench import _ratios, table


def _summary(p50: float) -> dict[str, float]:
    return {"p50": p50, "p99": p50 * 2, "p99_9": p50 * 3, "mean": p50, "min": p50 / 2, "max": p50 * 4, "samples": 100}


def _figures(size: int, msgs: float, rtt: float, cpu: float, *, latency: bool = True) -> dict[str, Any]:
    f: dict[str, Any] = {
        "size": size,
        "throughput": {"messages": 1000, "seconds": 1000 / msgs, "msgs_per_s": msgs, "mb_per_s": msgs * size / 1e6,
                       "cpu_s_per_msg": cpu, "producer_cpu_s_per_msg": cpu / 2, "consumer_cpu_s_per_msg": cpu / 2},
    }
    if latency:
        f["latency"] = {"one_way_us": _summary(rtt / 2), "round_trip_us": _summary(rtt)}
    else:
        f["error"] = "shmbroker echo failed: SegmentError: the ring is corrupt"
    return f


def _report() -> dict[str, Any]:
    return {
        "shmbroker_version": "0.1.0",
        "machine": {"cpu_model": "Test CPU", "cores": 2, "kernel": "6.18", "python": "3.11.7", "loadavg_at_start": [0.5, 0.5, 0.5]},
        "config": {"sizes": [64, 4096], "quick": False},
        "ceiling": {"memcpy": [{"size": 64, "msgs_per_s": 2e7, "mb_per_s": 1280.0}, {"size": 4096, "msgs_per_s": 5e6, "mb_per_s": 20480.0}]},
        "peers": {
            "shmbroker": {"status": "failed", "sizes": [_figures(64, 400_000, 10.0, 4e-6), _figures(4096, 300_000, 0, 5e-6, latency=False)]},
            "pipe": {"status": "ok", "sizes": [_figures(64, 200_000, 20.0, 2e-6), _figures(4096, 150_000, 30.0, 3e-6)]},
            "zmq": {"status": "skipped", "skipped": "pyzmq is not installed"},
        },
        "attach": {"status": "failed", "error": "the bench broker exited with 1"},
    }


def test_ratios_are_shmbroker_over_peer_and_skip_what_is_missing() -> None:
    report = _report()
    ratios = _ratios(report["peers"])
    assert list(ratios) == ["pipe"]
    small, large = ratios["pipe"]
    assert small == {"size": 64, "throughput": 2.0, "round_trip_p50": 2.0, "cpu_per_msg": 0.5}
    # shmbroker has no latency at 4 KiB: a throughput ratio, no latency ratio.
    assert large["throughput"] == 2.0 and "round_trip_p50" not in large


def test_table_shows_partial_figures_skips_and_failures() -> None:
    report = _report()
    report["ratios"] = _ratios(report["peers"])
    text = table.render(report)
    assert "2.00x" in text  # shmbroker twice pipe's throughput
    line = next(l for l in text.splitlines() if l.startswith("shmbroker") and "300k" in l)
    assert line.split()[3] == "-"  # no one-way p50 where latency failed
    assert "zmq: skipped: pyzmq is not installed" in text
    assert "shmbroker: FAILED: 4 KiB: shmbroker echo failed" in text
    assert "attach: FAILED: the bench broker exited with 1" in text
    assert "memcpy (ceiling)" in text


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed (pip install 'shmbroker[bench]')")
def test_plot_draws_a_partial_report(tmp_path: Path) -> None:
    from shmbroker._bench import plot

    report = _report()
    path = tmp_path / "p.png"
    plot.draw(report, str(path))
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
