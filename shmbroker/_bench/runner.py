"""Worker processes: forked, started together, collected, and never left behind.

Every worker sets PR_SET_PDEATHSIG (SIGKILL) first thing, so it dies with
the harness however the harness dies; the harness also kills every worker
it started when anything fails or Ctrl-C arrives.
"""

from __future__ import annotations

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
from .._sys.pdeathsig import set_parent_death_signal

# Setup is attaching, connecting or mapping: seconds at most, even loaded.
SETUP_TIMEOUT = 30.0
# How often the harness looks for a worker that died without a word.
POLL_INTERVAL = 0.05


class BenchError(errors.ShmBrokerError):
    """A measurement could not be made (a worker failed, hung or lied)."""


Ready = Callable[[], None]


def _bootstrap(parent: int, conn: multiprocessing.connection.Connection, go: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # the harness died before prctl took effect
        os._exit(1)
    # Ctrl-C goes to the whole foreground process group; the harness alone
    # decides, and kills us, so a worker never prints a KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def ready() -> None:
        conn.send(("ready", None))
        if not go.wait(SETUP_TIMEOUT * 2):
            raise BenchError("the harness never started the measurement")

    try:
        result = fn(ready, *args)
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


class WorkerGroup:
    """Start workers, release them at once when all are set up, collect results."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.ctx = multiprocessing.get_context("fork")
        self.go = self.ctx.Event()
        self.workers: list[_Worker] = []

    def spawn(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        receiver, sender = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_bootstrap, args=(os.getpid(), sender, self.go, fn, args), name=name, daemon=True)
        proc.start()
        sender.close()
        self.workers.append(_Worker(name, proc, receiver))

    def _check_others(self) -> None:
        for w in self.workers:
            code = w.proc.exitcode
            if code not in (None, 0) and not w.conn.poll():
                raise BenchError(f"{w.name} died ({_describe_exit(code)})")

    def _receive(self, worker: _Worker, deadline: float, what: str) -> Any:
        while True:
            if worker.conn.poll(POLL_INTERVAL):
                try:
                    status, value = worker.conn.recv()
                except EOFError:
                    worker.proc.join(1.0)
                    raise BenchError(f"{worker.name} died ({_describe_exit(worker.proc.exitcode)})") from None
                if status == "err":
                    raise BenchError(f"{worker.name} failed: {value}")
                return value
            self._check_others()
            if time.monotonic() > deadline:
                raise BenchError(f"{worker.name} did not {what} within {self.timeout if what != 'get ready' else SETUP_TIMEOUT:g} s")

    def run(self) -> list[Any]:
        """Results of every worker in spawn order; raises BenchError on any failure."""
        try:
            deadline = time.monotonic() + SETUP_TIMEOUT
            for w in self.workers:
                self._receive(w, deadline, "get ready")
            self.go.set()
            deadline = time.monotonic() + self.timeout
            results = [self._receive(w, deadline, "finish") for w in self.workers]
            for w in self.workers:
                w.proc.join(max(0.1, deadline - time.monotonic()))
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
