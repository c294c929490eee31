"""A peer forging the broker's log and `status` through its executable's
file name (found by the red team).

A peer chooses the name of the file it runs: a copy of the interpreter named
``py`` + newline + a whole log line in the broker's format + an ANSI
"erase line" and a carriage return.  Written raw, one refusal became a second,
forged line ("attached pid 1 uid 0 ... to channel 'secret'") in the broker's
log and in `shmbroker status`, with the real rest of the line hidden.  Now
everything not printable is escaped and field values are quoted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from adversary import write_config
from conftest import env_for_copy
from helpers import NOBODY

# Consumes "frames" as it is told to; asks for "secret", which no rule allows it.
ATTACKER = r"""
import sys
from shmbroker import ShmClient, errors
try:
    ShmClient.attach("secret", "consumer", socket_path=sys.argv[1]).close()
    print("granted", flush=True)
except errors.PermissionDenied:
    print("refused", flush=True)
with ShmClient.attach("frames", "consumer", socket_path=sys.argv[1]):
    print("attached", flush=True)
    sys.stdin.readline()
"""

LINE_START = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z shmbroker\[\d+\] (?:debug|info|warning|error|critical): "


def _config(tmp: Path) -> str:
    return write_config(tmp, f"""
[broker]
socket_group = {NOBODY}
[channels.frames]
size = 65536
[channels.secret]
size = 65536
[status]
uids = [0]
[[rules]]
uids = [{NOBODY}]
channels = ["frames"]
roles = ["consumer"]
""")


def _unprintable(text: str) -> list[str]:
    return sorted({repr(ch) for line in text.split("\n") for ch in line if not ch.isprintable()})


def test_a_peer_named_like_a_log_line_cannot_forge_one(broker_factory: Any, short_tmp: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the attacker as another uid")
    broker = broker_factory("--config", _config(short_tmp))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    forged = (
        f"{stamp}.000Z shmbroker[{broker.pid}] info: attached pid 1 uid 0 exe \u2215usr\u2215bin\u2215camera "
        "to channel 'secret' as consumer (size 65536, generation 1)"
    )
    name = "py\n" + forged + "\x1b[2K\r\u2028\x85"
    evil = short_tmp / "evil"
    evil.mkdir(mode=0o755)
    binary = evil / name
    shutil.copy2(os.path.realpath(sys.executable), binary)
    attacker = subprocess.Popen(
        [str(binary), "-c", ATTACKER, broker.socket], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env_for_copy(), user=NOBODY, group=NOBODY, extra_groups=[],
    )
    try:
        assert attacker.stdout is not None and attacker.stdin is not None
        assert attacker.stdout.readline() == "refused\n", attacker.stderr.read() if attacker.stderr else ""
        assert attacker.stdout.readline() == "attached\n"
        shown = subprocess.run(
            [sys.executable, "-m", "shmbroker", "status", "--socket", broker.socket],
            capture_output=True, text=True, timeout=30,
        )
        attacker.stdin.write("done\n")
        attacker.stdin.flush()
        assert attacker.wait(30) == 0
    finally:
        attacker.kill()
        attacker.wait()
    escaped = "py\\n" + forged + "\\x1b[2K\\r\\u2028\\x85"

    # `shmbroker status` (root reading it on a terminal): no control
    # character at all, and the peer's exe shown escaped on its own line.
    assert shown.returncode == 0, shown.stderr
    assert _unprintable(shown.stdout) == []
    assert not any(line.startswith(forged[:30]) for line in shown.stdout.split("\n"))
    (peer_line,) = [line for line in shown.stdout.split("\n") if line.lstrip().startswith("consumer pid")]
    assert peer_line.endswith(escaped), peer_line

    # The broker's text log: one line per record, each in the broker's
    # format, the refusal once with the name escaped and quoted.
    log = broker.log.read_text()
    lines = log.split("\n")[:-1]
    assert _unprintable(log) == []
    assert [line for line in lines if not re.match(LINE_START, line)] == []
    assert [line for line in lines if re.match(LINE_START + "attached pid 1 uid 0", line)] == []
    (refusal,) = [line for line in lines if "security event request_refused" in line]
    assert f'exe="{str(evil)}/{escaped}" channel=secret role=consumer' in refusal, refusal
    (attached,) = [line for line in lines if re.match(LINE_START + f"attached pid {attacker.pid} ", line)]
    assert f'exe "{str(evil)}/{escaped}" to channel \'frames\'' in attached, attached
