"""Ring channels through a real broker: API, fan-out, limits, dead peers, revocation, wake-ups."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import pytest

from shmbroker import ShmClient, errors
from shmbroker._ring import layout as L
from shmbroker._ring import waiting

from conftest import wait_for
from ring_helpers import Worker

# Every test here runs against the C core and the pure-Python reference.
pytestmark = pytest.mark.usefixtures("ring_impl")

KiB = 1024


def attach(broker: Any, role: str, name: str = "r", **kw: Any) -> Any:
    return ShmClient.attach(name, role, socket_path=broker.socket, **kw)


def producer(broker: Any, name: str = "r", size: int = 64 * KiB, max_message: int = 4 * KiB) -> Any:
    return attach(broker, "producer", name, size=size, ring=True, max_message=max_message)


def test_send_and_receive_every_way(broker: Any) -> None:
    with producer(broker) as p, attach(broker, "consumer") as c:
        assert p.max_message == c.max_message == 4 * KiB
        p.send(b"one")
        p.send(bytearray(b"two"))
        p.send(memoryview(b"xthreex")[1:-1])
        assert p.send_many([b"four", b"", b"six"]) == 3
        with p.reserve(5) as view:
            view[:] = b"seven"
        assert c.recv() == b"one"
        buf = bytearray(16)
        assert c.recv_into(buf) == 3 and buf[:3] == b"two"
        with c.receive_view() as view:
            assert bytes(view) == b"three" and view.readonly
        assert c.recv_many(10) == [b"four", b"", b"six", b"seven"]
        with pytest.raises(errors.Empty, match="within 0.05s"):
            c.recv(timeout=0.05)
        # Consumers cannot scribble on the ring through .buf.
        assert c.buf.readonly


def test_fan_out_every_consumer_gets_every_message(broker: Any) -> None:
    with producer(broker) as p:
        consumers = [attach(broker, "consumer") for _ in range(3)]
        try:
            messages = [os.urandom(n) for n in range(0, 3000, 150)]  # fits the ring: we send before reading
            for msg in messages:
                p.send(msg)
            for c in consumers:
                assert [c.recv(timeout=5) for _ in messages] == messages
        finally:
            for c in consumers:
                c.close()


def test_limits_have_clear_errors(broker: Any) -> None:
    with producer(broker, max_message=100) as p, attach(broker, "consumer") as c:
        with pytest.raises(errors.MessageTooLarge, match="101 bytes exceeds channel 'r'.s max_message of 100"):
            p.send(bytes(101))
        p.send(bytes(100))
        small = bytearray(10)
        with pytest.raises(errors.MessageTooLarge, match="stays queued"):
            c.recv_into(small)
        assert small == bytearray(10), "a short bytearray must not grow or change"
        assert c.recv() == bytes(100)
        # An oversized item in a batch: what came before it is delivered, nothing after.
        with pytest.raises(errors.MessageTooLarge, match="101 bytes"):
            p.send_many([b"a", b"b", bytes(101), b"c"])
        assert c.recv_many(10) == [b"a", b"b"]
        with pytest.raises(TypeError):
            p.send_many([b"d", 42])  # type: ignore[list-item]
        assert c.recv_many(10) == [b"d"]
        with pytest.raises(errors.ChannelBusy, match="already has a producer"):
            attach(broker, "producer")
        with pytest.raises(errors.UnsupportedOperation, match=r"send\(\) is for producers, .* is a consumer"):
            c.send(b"x")
        with pytest.raises(errors.UnsupportedOperation, match=r"recv\(\) is for consumers, .* is a producer"):
            p.recv()
    with pytest.raises(ValueError, match="does not fit"):
        attach(broker, "producer", "tiny", size=8 * KiB, ring=True, max_message=8 * KiB)


def test_consumer_slots_are_limited(broker: Any) -> None:
    with producer(broker) as p:
        consumers = [attach(broker, "consumer") for _ in range(L.MAX_CONSUMERS)]
        try:
            with pytest.raises(errors.ChannelBusy, match=f"already has {L.MAX_CONSUMERS} consumers"):
                attach(broker, "consumer")
            consumers.pop().close()
            consumers.append(attach(broker, "consumer"))  # the slot was freed
            p.send(b"all")
            assert all(c.recv(timeout=5) == b"all" for c in consumers)
        finally:
            for c in consumers:
                c.close()


def test_raw_and_ring_channels_do_not_mix(broker: Any) -> None:
    with attach(broker, "producer", "raw", size=8192) as raw:
        with pytest.raises(errors.UnsupportedOperation, match=r"send\(\) needs a ring channel, but 'raw' is a raw channel"):
            raw.send(b"x")
        with pytest.raises(errors.ChannelBusy, match="raw channel"):
            attach(broker, "producer", "raw", size=8192, ring=True)
        raw.buf[:2] = b"ok"  # raw channels keep working as before


def test_full_ring_times_out_and_reserve_aborts_on_error(broker: Any) -> None:
    with producer(broker, size=L.DATA_OFFSET + 4096, max_message=1000) as p, attach(broker, "consumer") as c:
        sent = 0
        with pytest.raises(errors.Full, match="slowest consumer"):
            while True:
                p.send(bytes([sent]) * 1000, timeout=0)
                sent += 1
        assert sent == 4096 // 1008
        with pytest.raises(errors.Full, match="within 0.05s"):
            p.send(b"x", timeout=0.05)
        assert c.recv() == bytes([0]) * 1000
        with pytest.raises(RuntimeError):
            with p.reserve(3) as view:
                view[:] = b"bad"
                raise RuntimeError("abort")
        p.send(b"good")
        for i in range(1, sent):
            assert c.recv() == bytes([i]) * 1000
        assert c.recv() == b"good"  # the aborted reservation never appeared
        with pytest.raises(errors.Empty):
            c.recv(timeout=0)


def test_messages_published_before_the_first_consumer_are_kept(broker: Any) -> None:
    with producer(broker) as p:
        p.send(b"early")
        with attach(broker, "consumer") as c:
            assert c.recv(timeout=5) == b"early"


def test_dead_consumer_does_not_stall_the_producer(broker: Any) -> None:
    """The producer waits for the slowest live consumer; a dead one is dropped by the broker."""
    with producer(broker, size=L.DATA_OFFSET + 4096, max_message=500) as p, attach(broker, "consumer") as live:
        ready = os.pipe()

        def lazy_consumer() -> None:
            c = attach(broker, "consumer")
            os.write(ready[1], b"x")
            time.sleep(60)  # never reads
            c.close()

        worker = Worker(lazy_consumer)
        os.read(ready[0], 1)
        sent = 0
        with pytest.raises(errors.Full):
            for _ in range(100):
                p.send(bytes(500), timeout=0)
                sent += 1
        assert len(live.recv_many(100)) == sent
        with pytest.raises(errors.Full):
            p.send(bytes(500), timeout=0)  # the lazy consumer holds the ring
        worker.kill()
        # The broker notices the dead peer, frees its slot and wakes us.
        p.send(bytes(500), timeout=10)
        assert live.recv(timeout=5) == bytes(500)
        for fd in ready:
            os.close(fd)


def test_revocation_wakes_sleepers_and_fails_every_peer(broker: Any) -> None:
    with producer(broker) as p, attach(broker, "consumer") as c:
        outcome: list[BaseException] = []

        def sleeper() -> None:
            try:
                c.recv()  # no timeout: only the revocation can end this
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=sleeper)
        thread.start()
        time.sleep(0.2)
        os.kill(broker.pid, signal.SIGUSR1)  # panic: wipe and revoke everything
        thread.join(10)
        assert not thread.is_alive(), "a sleeping consumer was not woken by the revocation"
        assert len(outcome) == 1 and isinstance(outcome[0], errors.ChannelRevoked)
        with pytest.raises(errors.ChannelRevoked):
            p.send(b"x")
        with pytest.raises(errors.ChannelRevoked):
            c.recv(timeout=0)


def test_no_lost_wakeup_when_a_message_lands_before_the_flag(broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer saw an empty ring; the producer then sends while the
    consumer's sleeping flag is still clear, so it signals nobody.  Only the
    re-check after setting the flag can find the message: without it the
    consumer would go to sleep in poll(2) with a message waiting (and, with
    no timeout and no further send, sleep forever)."""
    with producer(broker) as p, attach(broker, "consumer") as c:
        original = waiting._spin

        def spin_then_race(ready: Any, deadline: Any) -> bool:
            assert not original(ready, deadline)
            p.send(b"raced")
            return False

        def no_sleep(fd: int, timeout: Any) -> bool:
            raise AssertionError("the consumer went to sleep although a message was waiting (lost wake-up)")

        monkeypatch.setattr(waiting, "_spin", spin_then_race)
        monkeypatch.setattr(waiting.eventfd, "wait", no_sleep)
        assert c.recv(timeout=2) == b"raced"


def test_sleeping_consumer_is_woken_by_another_process(broker: Any) -> None:
    with producer(broker) as p:
        def consume() -> bytes:
            with attach(broker, "consumer") as c:
                return c.recv(timeout=30)

        worker = Worker(consume)
        wait_for(lambda: sum(1 for peer in broker.status()["channels"][0]["peers"] if peer["role"] == "consumer"), what="consumer")
        time.sleep(0.2)  # well past the spin phase: it sleeps in poll(2)
        p.send(b"wake up")
        assert worker.join(30) == b"wake up"


def test_idle_consumer_burns_no_cpu(broker: Any) -> None:
    with producer(broker):
        def idle() -> None:
            with attach(broker, "consumer") as c:
                c.recv()

        worker = Worker(idle)
        try:
            time.sleep(0.3)
            def cpu_ticks() -> int:
                fields = open(f"/proc/{worker.pid}/stat").read().rsplit(")", 1)[1].split()
                return int(fields[11]) + int(fields[12])  # utime + stime
            before = cpu_ticks()
            time.sleep(1.0)
            # A spinning consumer would use ~100 ticks per second here.
            assert cpu_ticks() - before <= 3
        finally:
            worker.kill()


def test_one_event_loop_consumes_two_channels(broker: Any) -> None:
    with producer(broker, "a") as pa, producer(broker, "b") as pb, attach(broker, "consumer", "a") as ca, attach(broker, "consumer", "b") as cb:
        async def consume(c: Any, n: int) -> list[bytes]:
            return [await c.recv_async(timeout=10) for _ in range(n)]

        async def main() -> tuple[list[bytes], list[bytes]]:
            tasks = asyncio.gather(consume(ca, 50), consume(cb, 50))
            await asyncio.sleep(0.05)  # both consumers are waiting on their eventfds now
            for i in range(50):
                await pa.send_async(b"a%d" % i)
                pb.send(b"b%d" % i)
                if i % 10 == 0:
                    await asyncio.sleep(0.01)
            return await tasks

        got_a, got_b = asyncio.run(main())
        assert got_a == [b"a%d" % i for i in range(50)]
        assert got_b == [b"b%d" % i for i in range(50)]

        async def empty() -> None:
            await ca.recv_async(timeout=0.05)

        with pytest.raises(errors.Empty):
            asyncio.run(empty())


def test_async_example_runs(broker: Any) -> None:
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "async_consumer.py"
    out = subprocess.run([sys.executable, str(example), "--socket", broker.socket], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("sensors", "commands"):
        assert [line for line in out.stdout.splitlines() if line.startswith(f"[{name}]")] == [
            f"[{name}] {name} #{i}" for i in range(5)
        ]


@pytest.mark.parametrize("side", ["producer", "consumer"])
def test_closing_an_attachment_while_another_thread_copies_a_large_message_is_safe(broker: Any, side: str) -> None:
    """Copies of 64 KiB and more run without the GIL (the C core), so another
    thread can close the attachment in the middle of one.  The mapping must
    outlive the copy: the process survives, the copying thread gets an
    error or finishes, never a crash or a wedge."""
    size = 1024 * KiB
    with producer(broker, "big", size=8 * size, max_message=size) as p, attach(broker, "consumer", "big") as c:
        victim = p if side == "producer" else c
        stop = threading.Event()
        outcome: list[BaseException | None] = []
        msg = os.urandom(size)
        buf = bytearray(size)

        def feed() -> None:
            # The other side keeps the victim busy: the producer never full, the consumer never empty.
            while not stop.is_set():
                try:
                    if side == "producer":
                        c.recv_into(buf, timeout=0.05)
                    else:
                        p.send(msg, timeout=0.05)
                except errors.ShmBrokerError:
                    pass

        def copy() -> None:
            try:
                for _ in range(100_000):
                    if side == "producer":
                        victim.send(msg, timeout=1)
                    else:
                        victim.recv_into(buf, timeout=1)
                outcome.append(None)
            except (errors.ShmBrokerError, ValueError) as exc:  # closed under it: a clear error
                outcome.append(exc)

        helper = threading.Thread(target=feed)
        worker = threading.Thread(target=copy)
        helper.start()
        worker.start()
        time.sleep(0.2)
        victim.close()
        worker.join(10)
        stop.set()
        helper.join(10)
        assert not worker.is_alive(), "the copying thread wedged after close()"
        assert outcome, "the copying thread died without an outcome"


def test_asking_for_no_messages_is_refused_and_leaves_the_consumer_usable(broker: Any) -> None:
    """Found by a red team: in the C core, recv_many(0) returned between
    marking the endpoint busy and unmarking it, and every later call said the
    endpoint was used by two threads at once."""
    with producer(broker, "zero") as p, attach(broker, "consumer", "zero") as c:
        try:
            assert c.recv_many(0, timeout=0.1) == []
        except ValueError:
            pass  # refusing to wait for no messages is as good an answer
        p.send(b"still here")
        assert c.recv(timeout=5) == b"still here"


def test_a_nan_timeout_is_refused_not_slept_on_forever(broker: Any) -> None:
    """(int)NaN in C is undefined (INT_MIN here), which poll() took as
    'forever': a NaN timeout is a ValueError, as a negative one is."""
    with producer(broker, "nan"), attach(broker, "consumer", "nan") as c:
        with pytest.raises(ValueError, match="timeout"):
            c.recv(timeout=float("nan"))  # nothing queued: it would have to wait


def test_a_message_copied_while_another_thread_closes_is_never_returned_torn(broker: Any) -> None:
    """Found by a red team: close() puts private zero pages under a mapping,
    so a C copy running without the GIL at that moment read zeros, and the
    checks after it (the revoked word, the reserve index) read zeros too and
    passed: recv_into returned success for a message partly zero.  Every
    call racing a close either returns the message whole or raises."""
    import random

    size = 8 << 20
    msg = b"\xab" * size
    torn = intact = 0
    for round_ in range(10):
        with producer(broker, f"torn{round_}", size=40 << 20, max_message=size) as p:
            for _ in range(4):
                p.send(msg, timeout=0)
            c = attach(broker, "consumer", f"torn{round_}")
            buf = bytearray(size)
            returned: list[bool] = []

            def receive() -> None:
                for _ in range(4):
                    try:
                        n = c.recv_into(buf, timeout=0.2)
                    except (errors.ShmBrokerError, ValueError):
                        return
                    returned.append(n == size and buf == msg)

            worker = threading.Thread(target=receive)
            worker.start()
            time.sleep(random.uniform(0, 0.006))
            c.close()
            worker.join(10)
            torn += returned.count(False)
            intact += returned.count(True)
    assert torn == 0, f"{torn} torn message(s) returned as received ({intact} intact)"


def test_a_ring_data_area_over_4_gib_is_refused_with_the_reason() -> None:
    """A PAD's length is a 32-bit field covering the rest of the area: on a
    larger area the C producer wrote a truncated one and honest consumers saw
    a corrupt ring (found by a red team).  Such a ring is refused up front."""
    reason = L.check_geometry(1 << 33, 4096)
    assert reason is not None and "4 GiB" in reason
    assert L.check_geometry(1 << 31, 4096) is None
