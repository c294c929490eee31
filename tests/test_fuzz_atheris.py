"""Coverage-guided fuzzing of the sans-IO protocol with atheris (long target)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).parent / "fuzz" / "atheris_protocol.py"
RUNS = int(os.environ.get("SHMBROKER_ATHERIS_RUNS", "300000"))


@pytest.mark.long
def test_atheris_protocol_fuzz(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris, or the `fuzz` extra)")
    result = subprocess.run(
        [sys.executable, str(HARNESS), f"-runs={RUNS}", "-max_len=512", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    done = re.search(r"Done (\d+) runs", result.stderr)
    assert done and int(done.group(1)) == RUNS
    print(f"\natheris: {done.group(1)} inputs, " + (re.findall(r"cov: \d+ ft: \d+", result.stderr) or ["?"])[-1])
