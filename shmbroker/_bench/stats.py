"""Summary statistics of latency samples, without numpy."""

from __future__ import annotations

import math
from collections.abc import Sequence

# The percentiles every latency figure reports.  p99.9 needs about 1000
# samples to mean anything; with fewer it is (honestly) close to the maximum.
PERCENTILES = (("p50", 50.0), ("p99", 99.0), ("p99_9", 99.9))


def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted samples.

    Linear interpolation between closest ranks, the definition numpy uses by
    default ("linear", Hyndman & Fan type 7), so figures compare with other tools.
    """
    if not sorted_samples:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within 0..100, not {q}")
    rank = (len(sorted_samples) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = math.ceil(rank)
    if lo == hi:
        return float(sorted_samples[lo])
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * (rank - lo)


def summarize_ns(samples: Sequence[int]) -> dict[str, float]:
    """Percentiles, mean, min and max of nanosecond samples, in microseconds."""
    if not samples:
        raise ValueError("no latency samples to summarize")
    ordered = sorted(samples)
    summary = {name: percentile(ordered, q) / 1e3 for name, q in PERCENTILES}
    summary["mean"] = sum(ordered) / len(ordered) / 1e3
    summary["min"] = ordered[0] / 1e3
    summary["max"] = ordered[-1] / 1e3
    summary["samples"] = len(ordered)
    return summary
