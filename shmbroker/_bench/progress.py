"""A progress bar on stderr, without a dependency.

On a terminal it redraws one line; otherwise (CI logs, pipes) it prints one
line per finished step, so a log still shows how far a run got.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

WIDTH = 28
# Below this the bar itself gives way, so the count and label still show.
MIN_BAR = 8


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self._drawn = 0  # length of the line on screen, to blank it at the end

    @staticmethod
    def _columns() -> int:
        # Asked at each step: the terminal may be resized during a run.  One
        # column spare, because a line that fills the last column makes some
        # terminals wrap, and the next \r then redraws on a new line.
        return max(shutil.get_terminal_size(fallback=(80, 24)).columns - 1, 1)

    def step(self, label: str) -> None:
        """Announce the step about to run."""
        if self.tty:
            columns = self._columns()
            counter = f"{self.done}/{self.total}"
            width = WIDTH if columns >= WIDTH + 3 + len(counter) + 20 else MIN_BAR
            filled = width * self.done // self.total
            bar = "#" * filled + "." * (width - filled)
            line = f"[{bar}] {counter} {label}"[:columns]
            # Pad over what the previous, longer line left on screen.
            self.stream.write("\r" + line.ljust(min(self._drawn, columns)))
            self._drawn = len(line)
        else:
            self.stream.write(f"bench [{self.done + 1}/{self.total}] {label}\n")
        self.stream.flush()

    def advance(self) -> None:
        self.done += 1

    def finish(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self._drawn = 0
        self.stream.write(f"bench: {self.done} measurements in {time.monotonic() - self.start:.1f} s\n")
        self.stream.flush()
