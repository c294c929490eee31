"""Another uid's attach latency while one uid abuses the broker (issue 12, point 3).

    sudo .venv/bin/python benchmarks/abuse_latency.py [--samples 300] [--seconds 0]

Runs a private broker whose policy admits root and uid 65534 ("nobody"),
and whose socket group also lets uid 65533 connect (no rule names it).  The
victim is root: a process attaching to a live 1 MiB channel and closing,
one attach at a time.  Each scenario starts one abusive uid, measures the
victim's attaches, stops the abuser; an unloaded baseline is measured before
every scenario, so each ratio compares figures taken minutes apart at most
(this machine's speed drifts several-fold over a day).

Scenarios (one abusive uid each):
  refused-flood     uid 65533, no rule: connect, hello+attach, read the refusal, close, as fast as it can
  refused-requests  uid 65534, admitted: 4 connections pipelining status requests it may not make
  cursor-pipeline   uid 65534: a ring producer pipelining `cursors` requests it never reads
  connect-churn     uid 65534: connect, hello, close, as fast as it can
  connect-flood-4   uid 65534, four processes: a non-blocking connect and a close, as fast as they can
  big-channels      uid 65534: creates and drops 1 GiB channels (reserve and wipe work)

Prints the victim's p50/p90/max per scenario, the ratio of p50 to the
baseline's, the broker's CPU share and its peak fd count.  Needs root (it
runs processes as other uids).  A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from adversary import RawPeer, churn_large_channels, frames, pipeline_refused_status  # noqa: E402
from shmbroker import ShmClient, errors  # noqa: E402
from shmbroker._bench.machine import describe  # noqa: E402
from shmbroker._wire import messages as m  # noqa: E402

ADMITTED = 65534
OUTSIDER = 65533
GROUP = 65533


def _config(tmp: Path) -> str:
    path = tmp / "broker.toml"
    path.write_text(
        f"[broker]\nsocket_group = {GROUP}\n"
        "[status]\nuids = [0]\n"
        f"[[rules]]\nuids = [0, {ADMITTED}]\ncreate = true\n"
    )
    return str(path)


def _drop(uid: int) -> None:
    os.setgroups([])
    os.setgid(GROUP)
    os.setuid(uid)


def _spawn(uid: int, body: Callable[[], None], nice: int) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)  # the abuser's children are killed with it
            os.nice(nice)
            _drop(uid)
            body()
        except BaseException:
            pass
        finally:
            os._exit(0)
    return pid


def _refused_flood(path: str) -> Callable[[], None]:
    request = frames(m.Hello(), m.Attach(channel="x", role="producer", size=4096))

    def body() -> None:
        while True:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(5)
                    s.connect(path)
                    s.sendall(request)
                    while s.recv(65536):
                        pass
            except OSError:
                time.sleep(0.001)

    return body


def _refused_requests(path: str) -> Callable[[], None]:
    return lambda: pipeline_refused_status(path, connections=4, burst=64)


def _cursor_pipeline(path: str) -> Callable[[], None]:
    def body() -> None:
        producer = RawPeer(path)
        producer.send(frames(m.Hello(), m.Attach(channel="abuse", role="producer", size=65536, ring=True)))
        producer.reply(), producer.reply()
        consumer = RawPeer(path)
        consumer.send(frames(m.Hello(), m.Attach(channel="abuse", role="consumer")))
        consumer.reply(), consumer.reply()
        producer.sock.settimeout(None)
        request = frames(m.Cursors())
        while True:
            producer.sock.sendall(request * 256)  # blocks once the broker stops reading from us

    return body


def _connect_churn(path: str) -> Callable[[], None]:
    hello = frames(m.Hello())

    def body() -> None:
        while True:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(path)
                    s.sendall(hello)
            except OSError:
                time.sleep(0.001)

    return body


def _connect_flood(path: str) -> Callable[[], None]:
    """Four processes of one uid: a non-blocking connect and a close, as fast as they can."""

    def one() -> None:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                s.connect(path)
            except OSError:
                pass
            s.close()

    def body() -> None:
        for _ in range(3):
            if os.fork() == 0:
                one()
        one()

    return body


def _big_channels(path: str) -> Callable[[], None]:
    return lambda: churn_large_channels(path, size=1 << 30)


SCENARIOS: dict[str, Callable[[str], Callable[[], None]]] = {
    "refused-flood": _refused_flood,
    "refused-requests": _refused_requests,
    "cursor-pipeline": _cursor_pipeline,
    "connect-churn": _connect_churn,
    "connect-flood-4": _connect_flood,
    "big-channels": _big_channels,
}
UIDS = {"refused-flood": OUTSIDER}


def _victim(path: str, samples: int) -> list[float]:
    out = []
    for _ in range(samples):
        start = time.perf_counter()
        try:
            ShmClient.attach("victim", "consumer", socket_path=path, timeout=30).close()
        except errors.ShmBrokerError as exc:
            print(f"  victim attach failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        out.append(time.perf_counter() - start)
    return out


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "p50": statistics.median(xs) * 1e6,
        "p90": xs[int(len(xs) * 0.9)] * 1e6,
        "max": xs[-1] * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="Another uid's attach latency while one uid abuses the broker.")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="default: all")
    parser.add_argument("--landlock", choices=("auto", "on", "off"), default="auto")
    parser.add_argument(
        "--abuser-nice", type=int, default=0, metavar="N",
        help="run the abusers at this nice value: what a separate cgroup (systemd's user.slice against the "
        "broker's system.slice) gives the broker (default 0: the abusers compete with the broker as equals)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("abuse_latency: needs root (the abusers run as other uids)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="shmb-abuse-"))
    os.chmod(tmp, 0o755)
    sock = str(tmp / "run" / "broker.sock")
    log = open(tmp / "broker.log", "w")
    broker = subprocess.Popen(
        [sys.executable, "-m", "shmbroker", "serve", "--socket", sock, "--config", _config(tmp), "--landlock", args.landlock],
        stdout=log, stderr=log,
    )
    holder = None
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                ShmClient.status(socket_path=sock)
                break
            except errors.ShmBrokerError:
                if time.monotonic() > deadline or broker.poll() is not None:
                    print((tmp / "broker.log").read_text(), file=sys.stderr)
                    return 1
                time.sleep(0.05)
        holder = ShmClient.attach("victim", size=1 << 20, socket_path=sock)
        mach = describe()
        print(f"machine: {mach['cpu_model']}, {mach['cores']} cpus, Linux {mach['kernel']}, Python {mach['python']}; "
              f"--landlock {args.landlock}; abusers at nice {args.abuser_nice}; {args.samples} victim attaches per figure")
        print(f"{'scenario':<18} {'p50 us':>8} {'p90 us':>8} {'max us':>9} {'base p50':>9} {'ratio':>6} {'broker cpu':>10} {'fds peak':>8}")
        for name in args.scenario or list(SCENARIOS):
            base = _summary(_victim(sock, args.samples))
            pid = _spawn(UIDS.get(name, ADMITTED), SCENARIOS[name](sock), args.abuser_nice)
            time.sleep(1.0)  # let the abuse reach its steady state
            peak = _fds(broker.pid)
            cpu0, t0 = _cpu(broker.pid), time.monotonic()
            stop = threading.Event()

            def watch() -> None:
                nonlocal peak
                while not stop.is_set():
                    peak = max(peak, _fds(broker.pid))
                    time.sleep(0.05)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            loaded = _summary(_victim(sock, args.samples))
            cpu = (_cpu(broker.pid) - cpu0) / (time.monotonic() - t0)
            stop.set()
            watcher.join()
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            print(f"{name:<18} {loaded['p50']:8.0f} {loaded['p90']:8.0f} {loaded['max']:9.0f} {base['p50']:9.0f} "
                  f"{loaded['p50'] / base['p50']:6.2f} {cpu * 100:9.0f}% {peak:8d}", flush=True)
            time.sleep(0.5)
        return 0
    finally:
        if holder is not None:
            holder.close()
        broker.send_signal(signal.SIGTERM)
        broker.wait(30)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
