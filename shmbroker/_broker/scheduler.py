"""Fair scheduling of the broker's work between uids.

The broker is one thread, so any work done for one peer delays every other
one.  Everything a peer can make the broker do after accept() (verifying it,
handling each of its requests, each step of reserving or wiping a segment it
created) is a task queued under that peer's uid.  Each round gives every uid
with work a time quantum: its tasks run, oldest first, until the quantum is
spent (at least one task per round).  A uid pipelining requests over many
connections, or creating and dropping 1 GiB channels, therefore slows only
itself: another uid's next task waits at most one quantum per busy uid, the
deficit round robin of network schedulers with time as the currency.

Sans-IO: tasks are callables, the clock is injected.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

# A task returns True when it has more to do (it is queued again, behind
# the uid's other tasks) and False when it is finished.
Task = Callable[[], bool]

# Per uid and round.  Well above one request (tens of microseconds) and one
# segment step (segments.STEP_BYTES), so a lone busy uid still gets most of
# its work done per round, and low enough that a uid that saturates its
# share adds well under a millisecond to anyone else's round trip.
QUANTUM_SECONDS = 100e-6


class FairScheduler:
    def __init__(self, quantum: float = QUANTUM_SECONDS, clock: Callable[[], float] = time.perf_counter) -> None:
        self.quantum = quantum
        self._clock = clock
        # Per uid: work on what it already has (sessions, segments), and new
        # connections waiting to be verified.  The first goes first, so a
        # burst of connections from one uid cannot leave its own verified
        # handshakes unanswered until the handshake cap evicts them.
        self._queues: dict[int, tuple[collections.deque[Task], collections.deque[Task]]] = {}

    def __bool__(self) -> bool:
        return bool(self._queues)

    def add(self, uid: int, task: Task, *, new: bool = False) -> None:
        """Queue ``task`` for ``uid``; ``new`` for work that starts something (a verification)."""
        current, fresh = self._queues.setdefault(uid, (collections.deque(), collections.deque()))
        (fresh if new else current).append(task)

    def run_round(self) -> None:
        """One quantum for each uid that has work now: its tasks run in turn,
        a task that has more to do going to the back of its queue, until the
        quantum is spent or nothing is left (a uid that joins meanwhile waits
        for the next round)."""
        for uid in list(self._queues):
            queues = self._queues.get(uid)
            if queues is None:
                continue
            current, fresh = queues
            start = self._clock()
            while current or fresh:
                queue = current if current else fresh
                task = queue.popleft()
                if task():
                    current.append(task)
                if self._clock() - start >= self.quantum:
                    break
            if not (current or fresh) and self._queues.get(uid) is queues:
                del self._queues[uid]
        # Rotate so the uid served first this round is served last next round.
        if len(self._queues) > 1:
            first = next(iter(self._queues))
            self._queues[first] = self._queues.pop(first)
