"""The examples users copy from must keep working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import lasting_shm_objects, shm_leftovers

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_demo_runs_end_to_end_and_leaves_nothing() -> None:
    before = shm_leftovers()
    proc = subprocess.run([sys.executable, str(EXAMPLES / "demo.py")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checksum OK" in proc.stdout
    assert "broker verified 2 peer(s)" in proc.stdout
    assert "ring channel 'demo-ring': 1000 messages sent and received in order" in proc.stdout
    assert "objects left in /dev/shm: none" in proc.stdout
    assert lasting_shm_objects(before) == set()


def test_the_readme_quickstart_consumer_first_then_producer(broker_factory: Any) -> None:
    """The README's two-terminal quickstart, with the socket passed explicitly."""
    broker = broker_factory("--channel", "events:1MiB:ring")
    consumer = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "ring_consumer.py"), "--socket", broker.socket, "--count", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert consumer.stdout is not None
        assert consumer.stdout.readline() == "consumer: attached to 'events', waiting for messages\n"
        producer = subprocess.run(
            [sys.executable, str(EXAMPLES / "ring_producer.py"), "--socket", broker.socket, "hello", "second message"],
            capture_output=True, text=True, timeout=60,
        )
        assert producer.returncode == 0, producer.stderr
        assert producer.stdout == "producer: sent 2 message(s) on 'events'\n"
        out, err = consumer.communicate(timeout=60)
        assert consumer.returncode == 0, err
        assert out == "consumer: hello\nconsumer: second message\n"
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()


def test_demo_shows_the_brokers_log_when_the_broker_dies() -> None:
    """The demo deletes its directory on the way out, the broker's log with it:
    a broker that cannot start used to leave only "timed out waiting for the
    broker" (issue 15).  Here listen(2) fails with EPERM, from a seccomp filter
    the demo's children inherit; the demo's own processes never listen."""
    deny = Path(__file__).resolve().parent / "seccomp_deny.py"
    proc = subprocess.run(
        [sys.executable, str(deny), "50", "--", sys.executable, str(EXAMPLES / "demo.py")],  # 50: listen, x86-64
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert "the broker exited with status 1 before it served" in proc.stderr
    assert "broker log:" in proc.stderr and "hardening applied" in proc.stderr
