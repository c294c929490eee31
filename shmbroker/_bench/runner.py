"""Worker processes: forked, started together, collected, and never left behind.

Every worker sets PR_SET_PDEATHSIG (SIGKILL) first thing, so it dies with
the harness however the harness dies; the harness also kills every worker
it started when anything fails or Ctrl-C arrives.
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

from .. import errors
from .._sys.prctl import set_parent_death_signal

# Setup is attaching, connecting or mapping: seconds at most, even loaded.
SETUP_TIMEOUT = 30.0
# How often the harness looks for a worker that died without a word.
POLL_INTERVAL = 0.05


class BenchError(errors.ShmBrokerError):
    """A measurement could not be made (a worker failed, hung or lied)."""


class Sync:
    """A worker's side of the start and finish lines.

    ``sync()`` (calling the object) says "set up" and waits for the go that
    releases every worker at once.  ``sync.report(result)`` hands the result
    over and waits until every worker has reported: only then may a worker
    close its end, so no peer sees its partner go away (and perhaps drop
    messages still in flight) while the measurement is still running.
    """

    def __init__(self, conn: multiprocessing.connection.Connection, go: Any, done: Any) -> None:
        self.conn = conn
        self.go = go
        self.done = done
        self.reported = False

    def __call__(self) -> None:
        self.conn.send(("ready", None))
        if not self.go.wait(SETUP_TIMEOUT * 2):
            raise BenchError("the harness never started the measurement")

    def report(self, result: Any) -> None:
        self.conn.send(("ok", result))
        self.reported = True
        # The harness kills us if it never says done; no timeout needed here.
        self.done.wait()


Ready = Sync


def _bootstrap(parent: int, conn: multiprocessing.connection.Connection, go: Any, done: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # the harness died before prctl took effect
        os._exit(1)
    # Ctrl-C goes to the whole foreground process group; the harness alone
    # decides, and kills us, so a worker never prints a KeyboardInterrupt.
    # SIGINT was blocked across the fork (spawn()), so none can land before
    # this line; a fork gets no pending signals, so unblocking is safe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    sync = Sync(conn, go, done)
    try:
        result = fn(sync, *args)
        if not sync.reported:
            conn.send(("ok", result))
    except BaseException as exc:  # reported to the harness, which decides
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        at = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
        conn.send(("err", f"{type(exc).__name__}: {exc}{at}"))
    finally:
        conn.close()


@dataclasses.dataclass
class _Worker:
    name: str
    proc: Any
    conn: multiprocessing.connection.Connection
    inbox: collections.deque[Any] = dataclasses.field(default_factory=collections.deque)
    eof: bool = False


class WorkerGroup:
    """Start workers, release them at once when all are set up, collect results.

    Any worker failing or dying fails the whole group at once (its partner
    would otherwise wait forever for messages that never come).
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.ctx = multiprocessing.get_context("fork")
        self.go = self.ctx.Event()
        self.done = self.ctx.Event()
        self.workers: list[_Worker] = []

    def spawn(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        receiver, sender = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_bootstrap, args=(os.getpid(), sender, self.go, self.done, fn, args), name=name, daemon=True)
        # A Ctrl-C between fork and the worker ignoring SIGINT would kill the
        # worker with a KeyboardInterrupt inside multiprocessing's own exit
        # path; blocked here, it reaches the harness once start() returns.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        # Closed before the next fork, so each pipe has exactly one writer
        # and a dead worker shows up as EOF.
        sender.close()
        self.workers.append(_Worker(name, proc, receiver))

    def _pump(self, worker: _Worker) -> None:
        while not worker.eof and worker.conn.poll(0):
            try:
                status, value = worker.conn.recv()
            except EOFError:
                worker.eof = True
                break
            if status == "err":
                raise BenchError(f"{worker.name} failed: {value}")
            worker.inbox.append(value)
        if worker.eof and not worker.inbox:
            worker.proc.join(1.0)
            raise BenchError(f"{worker.name} died ({_describe_exit(worker.proc.exitcode)})")

    def _next_from_all(self, timeout: float, what: str) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            for w in self.workers:
                self._pump(w)
            waiting = [w for w in self.workers if not w.inbox]
            if not waiting:
                return [w.inbox.popleft() for w in self.workers]
            if time.monotonic() > deadline:
                raise BenchError(f"{', '.join(w.name for w in waiting)} did not {what} within {timeout:g} s")
            multiprocessing.connection.wait([w.conn for w in waiting], POLL_INTERVAL)

    def run(self) -> list[Any]:
        """Results of every worker in spawn order; raises BenchError on any failure."""
        try:
            self._next_from_all(SETUP_TIMEOUT, "get ready")
            self.go.set()
            started = time.monotonic()
            results = self._next_from_all(self.timeout, "finish")
            self.done.set()
            for w in self.workers:
                w.proc.join(max(1.0, self.timeout - (time.monotonic() - started)))
                if w.proc.exitcode is None:
                    raise BenchError(f"{w.name} did not exit after reporting")
            return results
        finally:
            self.close()

    def close(self) -> None:
        """Kill whatever is still running (only our own workers, by pid)."""
        for w in self.workers:
            if w.proc.exitcode is None:
                try:
                    os.kill(w.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for w in self.workers:
            w.proc.join()
            w.conn.close()
        self.workers = []


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
