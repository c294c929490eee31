"""A private broker for one bench run: its own socket, its own lifetime."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .. import errors
from .._sys.prctl import set_parent_death_signal

log = logging.getLogger(__name__)

# A cold start imports the package and binds; 15 s matches the test suite's
# own wait and is only reached on a badly overloaded machine.
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _die_with_parent() -> None:
    # Runs in the forked child before exec: the broker gets SIGTERM (a clean
    # shutdown that wipes its segments) if the harness dies, even by kill -9.
    set_parent_death_signal(signal.SIGTERM)


class TempBroker:
    def __init__(self, directory: Path, *args: str) -> None:
        self.socket = str(directory / "broker.sock")
        self.log = directory / "broker.log"
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shmbroker", "serve", "--socket", self.socket, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=logf,
                preexec_fn=_die_with_parent,
                # Ctrl-C reaches only the harness, which then stops us cleanly.
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _log_tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-10:])

    def _wait_ready(self) -> None:
        from .._client import ShmClient

        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise errors.ShmBrokerError(f"the bench broker exited with {self.proc.returncode}:\n{self._log_tail()}")
            if os.path.exists(self.socket):
                try:
                    ShmClient.status(socket_path=self.socket, timeout=1.0)
                    return
                except errors.ShmBrokerError:
                    pass
            time.sleep(0.02)
        raise errors.ShmBrokerError(f"the bench broker was not ready after {READY_TIMEOUT:g} s:\n{self._log_tail()}")

    def cpu_seconds(self) -> float:
        """The broker's user + system CPU so far (/proc/PID/stat; clock-tick resolution)."""
        with open(f"/proc/{self.proc.pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("bench broker %d ignored SIGTERM; killing it", self.proc.pid)
                self.proc.kill()
                self.proc.wait()
