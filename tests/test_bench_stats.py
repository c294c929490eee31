"""Percentiles and summaries of latency samples, against hand-computed values."""

from __future__ import annotations

import pytest

from shmbroker._bench.stats import percentile, summarize_ns


def test_percentile_interpolates_linearly_between_ranks() -> None:
    # numpy.percentile([1, 2, 3, 4], q) with its default "linear" method.
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 0) == 1
    assert percentile([1, 2, 3, 4], 100) == 4
    assert percentile([1, 2, 3, 4], 25) == pytest.approx(1.75)


def test_percentile_of_one_to_a_hundred() -> None:
    samples = list(range(1, 101))
    assert percentile(samples, 50) == pytest.approx(50.5)
    assert percentile(samples, 99) == pytest.approx(99.01)
    assert percentile(samples, 99.9) == pytest.approx(99.901)


def test_percentile_of_a_single_sample_is_that_sample() -> None:
    assert percentile([7], 50) == 7
    assert percentile([7], 99.9) == 7


def test_percentile_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)
    with pytest.raises(ValueError, match="0..100"):
        percentile([1, 2], 101)


def test_summary_sorts_and_converts_nanoseconds_to_microseconds() -> None:
    # 1000 samples 1..1000 us, shuffled: the tail is where outliers live.
    samples = [((i * 7919) % 1000 + 1) * 1000 for i in range(1000)]
    assert sorted(samples) == [i * 1000 for i in range(1, 1001)]
    s = summarize_ns(samples)
    assert s["samples"] == 1000
    assert s["min"] == 1.0 and s["max"] == 1000.0
    assert s["p50"] == pytest.approx(500.5)
    assert s["p99"] == pytest.approx(990.01)
    assert s["p99_9"] == pytest.approx(999.001)
    assert s["mean"] == pytest.approx(500.5)


def test_summary_of_no_samples_is_an_error() -> None:
    with pytest.raises(ValueError):
        summarize_ns([])
