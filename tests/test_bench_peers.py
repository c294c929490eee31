"""Every peer moves real messages between real processes, and the harness
notices when a peer loses, reorders or corrupts them, or a worker dies."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shmbroker._bench import measure
from shmbroker._bench.peers import PEER_NAMES, Lane, Peer, Receiver, RunContext, Sender, load
from shmbroker._bench.peers.pipe import PipePeer
from shmbroker._bench.runner import BenchError, WorkerGroup


@pytest.fixture
def ctx() -> Iterator[RunContext]:
    tmp = Path(tempfile.mkdtemp(prefix="shmbt-", dir="/tmp"))
    tag = f"shmbenchtest{os.getpid()}_"
    yield RunContext(tmpdir=tmp, tag=tag)
    leftovers = [n for n in os.listdir("/dev/shm") if n.startswith(tag)]
    for name in leftovers:
        os.unlink(f"/dev/shm/{name}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    # iceoryx2 keeps one global management file per prefix; anything else
    # left behind is a peer that does not clean up after itself.
    assert [n for n in leftovers if not n.endswith(".global_mgmt")] == []


@pytest.mark.parametrize("name", PEER_NAMES)
def test_peer_delivers_every_message_across_processes(name: str, ctx: RunContext) -> None:
    peer = load(name)()
    reason = peer.available()
    if reason is not None:
        pytest.skip(reason)
    peer.start(ctx)
    try:
        # Two lanes at once: two producer and two consumer processes.
        t = measure.throughput(peer, 4096, lanes=2, messages=300, duration_s=0.0)
        lat = measure.latency(peer, 64, samples=50, warmup=5)
    finally:
        peer.stop()
    assert t["messages"] == 600
    assert t["msgs_per_s"] > 0 and t["mb_per_s"] > 0 and t["cpu_s_per_msg"] > 0
    assert lat["round_trip_us"]["samples"] == 50
    assert lat["one_way_us"]["samples"] == 50
    # A round trip is two one-way trips: its median cannot be the smaller.
    assert lat["round_trip_us"]["p50"] > lat["one_way_us"]["p50"] > 0


def test_duration_mode_runs_for_about_that_long(ctx: RunContext) -> None:
    t = measure.throughput(PipePeer(), 64, lanes=1, messages=0, duration_s=0.2)
    assert t["messages"] > 0
    assert 0.2 <= t["seconds"] < 5.0


class _Mangled(Lane):
    """A pipe lane whose receiver damages what it delivers, one way or another."""

    def __init__(self, size: int, how: str) -> None:
        self.inner = PipePeer().lane(size, 0)
        self.how = how

    def open_sender(self) -> Sender:
        return self.inner.open_sender()

    def open_receiver(self) -> Receiver:
        inner = self.inner.open_receiver()
        how = self.how

        class Bad(Receiver):
            count = 0

            def recv_into(self, buf: bytearray) -> int:
                n = inner.recv_into(buf)
                self.count += 1
                if self.count == 40:
                    if how == "drop":
                        n = inner.recv_into(buf)
                    elif how == "corrupt":
                        buf[n - 1] ^= 0xFF
                    elif how == "short":
                        n -= 1
                return n

        return Bad()

    def close(self) -> None:
        self.inner.close()


class _MangledPeer(Peer):
    name = "mangled"

    def __init__(self, how: str) -> None:
        self.how = how

    def lane(self, size: int, index: int) -> Lane:
        return _Mangled(size, self.how)


@pytest.mark.parametrize(
    "how, message",
    [("drop", "lost or reordered"), ("corrupt", "corrupted payload"), ("short", "4095-byte message")],
)
def test_a_peer_that_damages_messages_fails_the_measurement(how: str, message: str) -> None:
    with pytest.raises(BenchError, match=message):
        measure.throughput(_MangledPeer(how), 4096, lanes=1, messages=100, duration_s=0.0)


def _raises(ready: Any) -> None:
    ready()
    raise ValueError("boom")


def _exits(ready: Any, code: int) -> None:
    ready()
    os._exit(code)


def _kills_itself(ready: Any) -> None:
    ready()
    os.kill(os.getpid(), signal.SIGKILL)


def _returns(ready: Any, value: int) -> int:
    ready()
    return value


def _waits_for_go(ready: Any) -> None:
    ready()
    import time

    time.sleep(60)  # a partner stuck on messages that will never come


def _fails_in_setup(ready: Any) -> None:
    raise OSError(2, "no such peer endpoint")


def test_worker_results_come_back_in_spawn_order() -> None:
    group = WorkerGroup(timeout=30)
    for i in range(3):
        group.spawn(f"w{i}", _returns, i)
    assert group.run() == [0, 1, 2]


@pytest.mark.parametrize(
    "fn, args, message",
    [
        (_raises, (), "w failed: ValueError: boom"),
        (_exits, (3,), "w died \\(exit code 3\\)"),
        (_kills_itself, (), "w died \\(killed by SIGKILL\\)"),
        (_fails_in_setup, (), "w failed: FileNotFoundError: .*no such peer endpoint"),
    ],
)
def test_a_failing_worker_fails_the_group_and_nothing_is_left_running(fn: Any, args: tuple[Any, ...], message: str) -> None:
    group = WorkerGroup(timeout=30)
    group.spawn("w", fn, *args)
    group.spawn("bystander", _waits_for_go)
    pids = [w.proc.pid for w in group.workers]
    started = time.monotonic()
    with pytest.raises(BenchError, match=message):
        group.run()
    # Failing fast, not after the setup or run timeouts.
    assert time.monotonic() - started < 20
    for pid in pids:
        # Reaped (not a zombie, not running): the group waited for each.
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        assert not os.path.exists(f"/proc/{pid}")


@pytest.mark.parametrize(
    "name, module, hint",
    [("faster-fifo", "faster_fifo", "faster-fifo is not installed"), ("zmq", "zmq", "pyzmq is not installed"), ("iceoryx2", "iceoryx2", "iceoryx2 is not installed")],
)
def test_a_missing_optional_peer_is_skipped_with_how_to_install_it(name: str, module: str, hint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util
    import json

    from shmbroker.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == module else real(n, *a))
    reason = load(name)().available()
    assert reason is not None and hint in reason and "pip install 'shmbroker[bench]'" in reason

    report = tmp_path / "r.json"
    assert main(["bench", "--quick", "--peers", f"{name},pipe", "--sizes", "64", "--json", str(report)]) == 0
    entry = json.loads(report.read_text())["peers"][name]
    assert entry == {"description": load(name).description, "status": "skipped", "skipped": reason}
    assert f"{name}: skipped: {hint}" in capsys.readouterr().out
