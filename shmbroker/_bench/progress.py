"""A progress bar on stderr, without a dependency.

On a terminal it redraws one line; otherwise (CI logs, pipes) it prints one
line per finished step, so a log still shows how far a run got.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 28


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()

    def step(self, label: str) -> None:
        """Announce the step about to run."""
        if self.tty:
            filled = WIDTH * self.done // self.total
            bar = "#" * filled + "." * (WIDTH - filled)
            line = f"\r[{bar}] {self.done}/{self.total} {label}"
            self.stream.write(line[:100].ljust(100))
        else:
            self.stream.write(f"bench [{self.done + 1}/{self.total}] {label}\n")
        self.stream.flush()

    def advance(self) -> None:
        self.done += 1

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 101 + "\r")
        self.stream.write(f"bench: {self.done} measurements in {time.monotonic() - self.start:.1f} s\n")
        self.stream.flush()
