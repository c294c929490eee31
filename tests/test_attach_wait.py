"""attach(wait=): a consumer may start before its producer (issue 16).

The broker holds the request until the channel exists (a ring: until it has
a producer) and answers then; no client polls.  A wait that runs out is a
Timeout; a uid may hold only so many; a client that gives up frees its slot.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from adversary import policy_toml, write_config
from shmbroker import ShmClient, errors


def _broker(broker_factory: Any, tmp: Path, **limits: Any) -> Any:
    return broker_factory("--config", write_config(tmp, policy_toml(limits=limits or None)))


def _later(seconds: float, fn: Any) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), fn()), daemon=True)
    thread.start()
    return thread


def test_a_consumer_started_first_gets_the_channel_when_its_producer_creates_it(broker_factory: Any, short_tmp: Path) -> None:
    broker = _broker(broker_factory, short_tmp)
    held: list[Any] = []
    producer = _later(0.5, lambda: held.append(ShmClient.attach("late", size=4096, socket_path=broker.socket)))
    start = time.monotonic()
    with ShmClient.attach("late", "consumer", socket_path=broker.socket, wait=10) as consumer:
        waited = time.monotonic() - start
        producer.join()
        held[0].buf[:5] = b"hello"
        assert bytes(consumer.buf[:5]) == b"hello"
    held[0].close()
    assert 0.4 < waited < 5, waited


def test_a_ring_consumer_waits_for_a_producer(broker_factory: Any, short_tmp: Path) -> None:
    broker = broker_factory("--channel", "events:64KiB:ring")
    held: list[Any] = []
    producer = _later(0.5, lambda: held.append(ShmClient.attach("events", socket_path=broker.socket)))
    start = time.monotonic()
    with ShmClient.attach("events", "consumer", socket_path=broker.socket, wait=10) as consumer:
        assert time.monotonic() - start > 0.4, "answered before the producer attached"
        producer.join()
        held[0].send(b"first")
        assert consumer.recv(timeout=5) == b"first"
    held[0].close()


def test_a_wait_that_runs_out_is_a_timeout_that_says_what_it_waited_for(broker_factory: Any, short_tmp: Path) -> None:
    broker = _broker(broker_factory, short_tmp)
    start = time.monotonic()
    with pytest.raises(errors.Timeout, match=r"waited 0.5s for the channel of 'never'"):
        ShmClient.attach("never", "consumer", socket_path=broker.socket, wait=0.5)
    assert 0.4 < time.monotonic() - start < 5
    # Without wait= nothing changed: an absent channel is refused at once.
    with pytest.raises(errors.ChannelNotFound):
        ShmClient.attach("never", "consumer", socket_path=broker.socket)


def test_a_uid_may_hold_only_so_many_waits_and_a_client_that_gives_up_frees_its_own(
    broker_factory: Any, short_tmp: Path
) -> None:
    import socket as socketlib

    from adversary import frames
    from shmbroker._wire import messages as m

    broker = _broker(broker_factory, short_tmp, max_waiting_per_uid=2)
    waiting = []
    for _ in range(2):
        s = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        s.connect(broker.socket)
        s.sendall(frames(m.Hello(), m.Attach(channel="absent", role="consumer", wait=60.0)))
        waiting.append(s)
    time.sleep(0.3)
    with pytest.raises(errors.LimitExceeded, match="max_waiting_per_uid"):
        ShmClient.attach("absent", "consumer", socket_path=broker.socket, wait=60)
    waiting.pop().close()  # one gives up: its place is free again
    time.sleep(0.3)
    with pytest.raises(errors.Timeout):
        ShmClient.attach("absent", "consumer", socket_path=broker.socket, wait=0.3)
    for s in waiting:
        s.close()


def test_what_a_held_client_sends_stays_in_its_own_socket_and_its_hang_up_is_still_seen(
    broker_factory: Any, short_tmp: Path
) -> None:
    """Held for up to a day, a request must not let its peer make the broker
    buffer more (found by the red team: 64 held requests with 1 MiB behind
    each grew the broker by 64 MiB).  The broker stops reading; the bytes
    wait in the peer's socket, which the kernel bounds."""
    import socket as socketlib

    from adversary import frames, wait_until
    from shmbroker._wire import messages as m

    broker = _broker(broker_factory, short_tmp)
    s = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    s.connect(broker.socket)
    s.sendall(frames(m.Hello(), m.Attach(channel="absent", role="consumer", wait=60.0)))
    time.sleep(0.3)
    s.setblocking(False)
    junk = b"\x00\x00\xff\xf0" + bytes(65520)  # one well-formed frame header after another
    accepted = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            accepted += s.send(junk)
        except BlockingIOError:
            time.sleep(0.05)  # give the broker every chance to read more
    assert accepted < 1 << 20, f"the broker took {accepted} bytes from a held connection"
    held = ShmClient.status(socket_path=broker.socket)["connections"]
    s.close()
    # Unread, it is polled for a hang-up each tick (at least once a second).
    wait_until(
        lambda: ShmClient.status(socket_path=broker.socket)["connections"] < held, timeout=5, what="the hang-up to be seen"
    )
