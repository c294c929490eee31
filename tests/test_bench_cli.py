"""`shmbroker bench` end to end, as a user runs it: a real subprocess, real
workers, real brokers; the report is checked, and nothing may outlive it."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from shmbroker._bench.peers import PEER_NAMES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A --quick run takes a few seconds on an idle 2-core machine; this bound
# only catches a hang on a loaded one.
RUN_TIMEOUT = 300
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _env(marker: str) -> dict[str, str]:
    # Every process the run starts inherits this, so we can find stragglers.
    return {**os.environ, "SHMBENCH_TEST_MARKER": marker}


def _marked_processes(marker: str) -> list[int]:
    needle = f"SHMBENCH_TEST_MARKER={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            pass  # gone already, or a kernel thread
    return found


def _assert_nothing_left(marker: str, harness_pid: int) -> None:
    deadline = time.monotonic() + 10
    while _marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _marked_processes(marker) == [], "processes started by the bench outlived it"
    tag = f"shmbench{harness_pid}_"
    assert [n for n in os.listdir("/dev/shm") if n.startswith(tag)] == []


def _bench(*args: str, marker: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmbroker", "bench", *args],
        capture_output=True, text=True, timeout=timeout, env=_env(marker), stdin=subprocess.DEVNULL,
    )


# Figures that may honestly be zero: a broker that stayed idle while messages flowed.
MAY_BE_ZERO = {"helper_cpu_s"}


def _positive_numbers(obj: Any, path: str = "") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in MAY_BE_ZERO:
                assert v >= 0, f"{path}.{k} is {v}"
                continue
            _positive_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _positive_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        assert obj > 0, f"{path} is {obj}"


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (pip install 'shmbroker[bench]')")
def test_quick_run_writes_a_well_formed_report_and_plot(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    report_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmbroker", "bench", "--quick", "--json", str(report_path), "--plot", str(plot_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(marker), stdin=subprocess.DEVNULL,
    )
    out, err = proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err
    _assert_nothing_left(marker, proc.pid)

    report = json.loads(report_path.read_text())
    assert report["schema"] == "shmbroker-bench/1"
    m = report["machine"]
    assert m["cpu_model"] and m["kernel"] == os.uname().release
    assert m["cores"] >= 1 and m["python"] == ".".join(map(str, sys.version_info[:3]))
    assert report["config"]["quick"] is True
    sizes = report["config"]["sizes"]
    assert sizes == [64, 4096, 65536, 1048576]
    assert set(report["peers"]) == set(PEER_NAMES) == set(report["config"]["peers"])
    ran = 0
    for name, entry in report["peers"].items():
        assert entry["status"] in ("ok", "skipped"), f"{name}: {entry}"
        if entry["status"] == "skipped":
            assert entry["skipped"], f"{name} skipped without a reason"
            continue
        ran += 1
        assert [f["size"] for f in entry["sizes"]] == sizes
        for f in entry["sizes"]:
            t, lat = f["throughput"], f["latency"]
            _positive_numbers(t, f"{name}.{f['size']}.throughput")
            _positive_numbers(lat, f"{name}.{f['size']}.latency")
            assert t["mb_per_s"] == pytest.approx(t["msgs_per_s"] * f["size"] / 1e6)
            for kind in ("one_way_us", "round_trip_us"):
                s = lat[kind]
                assert s["min"] <= s["p50"] <= s["p99"] <= s["p99_9"] <= s["max"]
    assert ran >= 4, "the stdlib peers (pipe, unix, mp-queue, shared-memory) always run"
    assert [c["size"] for c in report["ceiling"]["memcpy"]] == sizes
    _positive_numbers(report["ceiling"], "ceiling")
    attach = report["attach"]
    assert attach["status"] == "ok", attach
    _positive_numbers(attach, "attach")
    assert attach["rate"]["clients"] == 8
    shmb = report["peers"]["shmbroker"]
    if shmb["status"] == "ok":
        assert set(report["ratios"]) == {n for n, e in report["peers"].items() if e["status"] == "ok"} - {"shmbroker"}
    else:
        assert "issue 3" in shmb["skipped"] and report["ratios"] == {}
    assert not os.path.exists(report["cleanup"]["tmpdir"])

    # The table names every peer that ran and the ceiling.
    for name, entry in report["peers"].items():
        assert name in out
    assert "memcpy (ceiling)" in out and "attach rate" in out

    png = plot_path.read_bytes()
    assert png.startswith(PNG_MAGIC)
    assert len(png) > 20_000, "a plot of 7+ lines on two axes is not that small"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 800 and height >= 400


def test_list_peers_names_every_peer_and_why_one_cannot_run() -> None:
    result = _bench("--list-peers", marker="list")
    assert result.returncode == 0, result.stderr
    for name in PEER_NAMES:
        assert name in result.stdout
    assert "pipe           ok" in result.stdout


def test_subset_of_peers_and_sizes_with_a_message_count(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    report_path = tmp_path / "r.json"
    result = _bench("--peers", "pipe,unix", "--sizes", "1K,64K", "--messages", "200", "--producers", "2", "--consumers", "2", "--json", str(report_path), marker=marker)
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert list(report["peers"]) == ["pipe", "unix"]
    assert report["config"]["sizes"] == [1024, 65536]
    for entry in report["peers"].values():
        for f in entry["sizes"]:
            # 200 per producer, two producers.
            assert f["throughput"]["messages"] == 400
    assert report["config"]["producers"] == 2
    _assert_nothing_left(marker, -1)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--producers", "2", "--consumers", "1"], "--producers 2 and --consumers 1 differ"),
        (["--sizes", "8"], "message sizes must be 16 bytes"),
        (["--sizes", "64,lots"], "'lots'"),
        (["--sizes", ","], "give at least one size"),
        (["--peers", "pipe,carrier-pigeon"], "unknown peer 'carrier-pigeon'"),
        (["--messages", "10", "--duration", "1"], "not allowed with argument"),
        (["--messages", "0"], "must be greater than zero"),
        (["--duration", "soon"], "is not a number"),
        (["--plot", "/tmp/x.jpg"], "ends in .png|ending in .png"),
        (["--json", "/nonexistent-dir/x.json"], "does not exist"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(args: list[str], message: str) -> None:
    result = _bench(*args, marker="badargs", timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    import re

    assert re.search(message, result.stderr), result.stderr


def _start_long_run(tmp_path: Path, marker: str, peer: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmbroker", "bench", "--peers", peer, "--sizes", "4096", "--duration", "60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(marker), stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
        # A shell without job control starts background commands with SIGINT
        # ignored, and that survives exec: give the harness the default
        # disposition a foreground job has, or it rightly ignores Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    # Wait until the measurement runs: the harness plus its two workers.
    while len(_marked_processes(marker)) < 3:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "the workers never started"
        time.sleep(0.05)
    return proc


def test_kill_9_of_the_harness_takes_its_workers_along(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    proc = _start_long_run(tmp_path, marker, "shared-memory")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    _assert_nothing_left(marker, proc.pid)
    # Only the run's private directory stays (the next run removes it, see
    # below); this test removes it itself so the suite leaves nothing.
    for name in os.listdir("/tmp"):
        if name.startswith(f"shmbench-{proc.pid}-"):
            shutil.rmtree(f"/tmp/{name}")


def test_ctrl_c_stops_cleanly_with_exit_130(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    proc = _start_long_run(tmp_path, marker, "pipe")
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal sends to the foreground group
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err
    _assert_nothing_left(marker, proc.pid)


@pytest.mark.skipif(importlib.util.find_spec("iceoryx2") is None, reason="iceoryx2 is not installed (pip install 'shmbroker[bench]')")
def test_the_next_run_removes_what_a_killed_run_left(tmp_path: Path) -> None:
    # iceoryx2 names its files in /dev/shm itself: after kill -9 of the
    # harness nobody is left to remove them, so the next run does.
    marker = uuid.uuid4().hex
    proc = _start_long_run(tmp_path, marker, "iceoryx2")
    tag = f"shmbench{proc.pid}_"
    deadline = time.monotonic() + 30
    while not [n for n in os.listdir("/dev/shm") if n.startswith(tag)]:
        assert time.monotonic() < deadline, "iceoryx2 made no file with the run's prefix"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 10
    while _marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _marked_processes(marker) == []
    tmpdirs = [n for n in os.listdir("/tmp") if n.startswith(f"shmbench-{proc.pid}-")]
    assert tmpdirs, "the killed run's private directory should still be there"

    result = _bench("--quick", "--peers", "pipe", "--sizes", "64", "--json", str(tmp_path / "r.json"), marker=marker)
    assert result.returncode == 0, result.stderr
    assert [n for n in os.listdir("/dev/shm") if n.startswith(tag)] == []
    assert [n for n in os.listdir("/tmp") if n.startswith(f"shmbench-{proc.pid}-")] == []
    stale = json.loads((tmp_path / "r.json").read_text())["cleanup"]["stale_removed"]
    assert f"/tmp/{tmpdirs[0]}" in stale


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("columns", [80, 40, 12])
def test_the_progress_bar_fits_the_terminal(monkeypatch: pytest.MonkeyPatch, columns: int) -> None:
    """A line as wide as the terminal or wider wraps, and each redraw then
    scrolls one line instead of replacing the last."""
    from shmbroker._bench import progress

    monkeypatch.setattr(progress.shutil, "get_terminal_size", lambda fallback=(80, 24): os.terminal_size((columns, 24)))
    out = _Terminal()
    bar = progress.Progress(3, out)
    for label in ("shmbroker 1048576 B throughput of a rather long peer name", "pipe 64 B latency", "x"):
        bar.step(label)
        bar.advance()
    bar.finish()
    *drawn, summary = out.getvalue().split("\n")[0].split("\r")  # the summary ends the bar with a newline
    assert all(len(line) < columns for line in drawn), [len(line) for line in drawn]
    assert any("1/3 pipe 64 B latency" in line for line in drawn) or columns < 30, drawn
    assert out.getvalue().endswith(" s\n") and "bench: 3 measurements" in out.getvalue()
