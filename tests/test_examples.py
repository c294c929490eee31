"""The examples users copy from must keep working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import shm_leftovers

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_demo_runs_end_to_end_and_leaves_nothing() -> None:
    before = shm_leftovers()
    proc = subprocess.run([sys.executable, str(EXAMPLES / "demo.py")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checksum OK" in proc.stdout
    assert "broker verified 2 peer(s)" in proc.stdout
    assert "objects left in /dev/shm: none" in proc.stdout
    assert shm_leftovers() <= before
