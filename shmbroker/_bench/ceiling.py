"""The ceiling: how fast this machine copies a message within one process.

No IPC mechanism can deliver a copied payload faster than one memcpy of it,
so each peer is drawn against this line.  Measured at Python level
(``dst[:] = src`` on bytearrays, a straight memmove) so the per-call cost a
Python peer cannot avoid is in the ceiling too.
"""

from __future__ import annotations

import time
from typing import Any

# Copies are timed in batches so the clock read is not what we measure.
BATCH = 256


def memcpy(size: int, min_seconds: float) -> dict[str, Any]:
    src = bytearray(b"\xa5") * size
    dst = bytearray(size)
    copies = 0
    start = time.perf_counter_ns()
    end = start + int(min_seconds * 1e9)
    while True:
        for _ in range(BATCH):
            dst[:] = src
        copies += BATCH
        t = time.perf_counter_ns()
        if t >= end:
            break
    seconds = (t - start) / 1e9
    if dst != src:
        raise AssertionError("memcpy ceiling: the copy did not happen")
    return {"copies": copies, "seconds": seconds, "msgs_per_s": copies / seconds, "mb_per_s": copies * size / seconds / 1e6}
