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
