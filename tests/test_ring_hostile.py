"""Ring channels against hostile peers: the broker never blocks on a peer's
eventfd, and a truncated ring wakes and fails its sleepers."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import Any

from adversary import RawPeer, hello_attach, policy_toml, wait_until, write_config
from shmbroker import ShmClient, errors


def _eventfds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[eventfd]"
        except OSError:
            pass
    return count


def test_a_consumer_that_makes_its_eventfd_blocking_cannot_freeze_the_broker(broker_factory: Any, short_tmp: Path) -> None:
    config = policy_toml(channels={"ch": {"size": 65536, "ring": True}, "other": {"size": 65536}})
    b = broker_factory("--config", write_config(short_tmp, config))
    with ShmClient.attach("ch", "producer", socket_path=b.socket):
        hostile = ShmClient.attach("ch", "consumer", socket_path=b.socket)
        # O_NONBLOCK lives in the open file description every holder shares.
        kept = os.dup(hostile._ring_fds[0])
        fcntl.fcntl(kept, fcntl.F_SETFL, fcntl.fcntl(kept, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        hostile.close()
        try:
            # The next consumer gets the same slot: the broker resets its
            # eventfd, which must not block with the flag cleared.
            with ShmClient.attach("ch", "consumer", socket_path=b.socket, timeout=3):
                pass
            with ShmClient.attach("other", "consumer", socket_path=b.socket, timeout=3):
                pass
            assert b.status()["broker"]["pid"] == b.pid
        finally:
            os.close(kept)


def test_truncating_a_ring_wakes_its_sleepers_and_leaks_no_eventfd(broker_factory: Any, short_tmp: Path) -> None:
    config = policy_toml(channels={"ch": {"size": 65536, "backend": "posix", "ring": True}})
    b = broker_factory("--config", write_config(short_tmp, config))
    baseline = _eventfds(b.pid)
    sleeper = ShmClient.attach("ch", "consumer", socket_path=b.socket)
    hostile = RawPeer(b.socket)
    hostile.send(hello_attach("ch", size=None))
    hostile.replies(timeout=0.5)
    outcome: list[BaseException] = []

    def receive() -> None:
        try:
            sleeper.recv(timeout=None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    os.ftruncate(hostile.fds[0], 0)
    wait_until(lambda: b.events("segment_truncated"), what="the segment_truncated event")
    thread.join(10)
    assert not thread.is_alive(), "a sleeping consumer was not woken by the revocation"
    assert len(outcome) == 1 and isinstance(outcome[0], errors.ChannelRevoked)
    hostile.close()
    sleeper.close()
    wait_until(lambda: _eventfds(b.pid) == baseline, what="the broker to close the ring's eventfds")
