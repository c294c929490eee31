"""End-to-end demo (``make demo``): a broker, a producer and a consumer.

Starts a broker on a temporary socket, runs examples/consumer.py and
examples/producer.py as separate processes that exchange a payload through
one shared segment, shows what the broker verified about each of them, and
stops everything, checking that nothing was left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shmbroker import ShmClient
from shmbroker.errors import ShmBrokerError

HERE = Path(__file__).resolve().parent
PAYLOAD = 1 << 20
SEGMENT = "2MiB"


def shm_names() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("shmbroker")}


def show_log(log: Path) -> None:
    """The broker's own words: the demo deletes its directory on the way out."""
    text = log.read_text().strip() if log.exists() else ""
    print(f"broker log:\n{text or '(empty)'}", file=sys.stderr)


def wait_for_broker(broker: subprocess.Popen[str], sock: str, log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if broker.poll() is not None:
            print(f"demo: the broker exited with status {broker.returncode} before it served", file=sys.stderr)
            show_log(log)
            raise SystemExit(1)
        try:
            if os.path.exists(sock) and ShmClient.status(socket_path=sock):
                return
        except ShmBrokerError:
            pass
        time.sleep(0.02)
    print(f"demo: timed out after {timeout:.0f}s waiting for the broker", file=sys.stderr)
    show_log(log)
    raise SystemExit(1)


def client(procs: list[subprocess.Popen[str]], script: str, *args: str) -> subprocess.Popen[str]:
    """Start an example script with pipes for its stdin and stdout."""
    proc = subprocess.Popen(
        [sys.executable, "-u", str(HERE / script), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    procs.append(proc)
    return proc


def first_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="shmbroker-demo-"))
    sock = str(tmp / "run" / "broker.sock")
    log = tmp / "broker.log"
    procs: list[subprocess.Popen[str]] = []
    try:
        with open(log, "w") as logf:
            broker = subprocess.Popen(
                [sys.executable, "-m", "shmbroker", "serve", "--socket", sock, "--channel", f"demo:{SEGMENT}"],
                stdout=logf, stderr=logf, text=True,
            )
        procs.append(broker)
        wait_for_broker(broker, sock, log)
        print(f"1. broker pid {broker.pid} listening on {sock}")
        print("   policy: only this uid running this interpreter; segments are shm_open(O_EXCL, mode 0), unlinked, leased")

        # --hold keeps both attached until we have shown the broker's view.
        consumer = client(procs, "consumer.py", "--socket", sock, "--hold")
        print(f"2. {first_line(consumer)}")
        producer = client(procs, "producer.py", "--socket", sock, "--bytes", str(PAYLOAD), "--hold")
        print(f"3. {first_line(producer)}")
        print(f"4. {first_line(consumer)}")

        status = ShmClient.status(socket_path=sock)
        channel = next(c for c in status["channels"] if c["name"] == "demo")
        print(f"5. channel {channel['name']!r}: segment of {channel['size']} bytes, generation {channel['generation']}; "
              f"broker verified {len(channel['peers'])} peer(s):")
        for peer in channel["peers"]:
            print(f"   - {peer['role']:<8} pid {peer['pid']} uid {peer['uid']} gid {peer['gid']} exe {peer['exe']}")
        visible = shm_names()
        print(f"6. shmbroker objects in /dev/shm while attached: {sorted(visible) or 'none'}")

        # A message ring next to it (the C ring core, by default), in this process.
        with ShmClient.attach("demo-ring", "producer", socket_path=sock, size=64 << 10, ring=True) as ring_p, \
                ShmClient.attach("demo-ring", "consumer", socket_path=sock) as ring_c:
            sent = [f"message {i}".encode() for i in range(1000)]
            for message in sent:
                ring_p.send(message)
            in_order = [ring_c.recv(timeout=5) for _ in sent] == sent
        print(f"   ring channel 'demo-ring': {len(sent)} messages sent and received {'in order' if in_order else 'OUT OF ORDER'}")

        for proc in (consumer, producer):
            proc.communicate("done\n", timeout=30)
        if consumer.returncode or producer.returncode:
            print(f"demo: consumer exited {consumer.returncode}, producer {producer.returncode}", file=sys.stderr)
            show_log(log)
            return 1

        counters = ShmClient.status(socket_path=sock)["counters"]
        broker.send_signal(signal.SIGTERM)
        code = broker.wait(15)
        leftovers = shm_names()
        print(f"7. both detached; broker stopped with exit code {code}; socket removed: {not os.path.exists(sock)}; "
              f"attaches {counters.get('attaches', 0)}, segments wiped {counters.get('segments_wiped', 0)}")
        print(f"8. shmbroker objects left in /dev/shm: {sorted(leftovers) or 'none'}")
        ok = code == 0 and not visible and not leftovers and not os.path.exists(sock) and in_order
        print(f"\n{'OK' if ok else 'FAILED'}: {PAYLOAD} bytes went from producer to consumer through one private segment")
        if not ok:
            show_log(log)
        return 0 if ok else 1
    except KeyboardInterrupt:
        return 130
    except (ShmBrokerError, OSError, subprocess.SubprocessError) as exc:
        # A client or a status call failed: the broker's log says why.
        print(f"demo: {exc}", file=sys.stderr)
        show_log(log)
        return 1
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
