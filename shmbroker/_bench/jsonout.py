"""The JSON report: every figure, the machine, and how the run was made."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

SCHEMA = "shmbroker-bench/1"


def write(path: str, report: dict[str, Any]) -> None:
    """Write atomically: a reader never sees half a report."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".bench-", suffix=".json", dir=directory)
    try:
        # mkstemp makes the file 0600; a report is an ordinary output file,
        # so give it the mode open() would have (0666 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, sort_keys=False, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
