"""Faults: the broker is killed with SIGKILL while clients hold segments."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from helpers import lasting_shm_objects, shm_leftovers
from shmbroker import ShmClient, errors

PAYLOAD = b"still-here-after-the-broker-died"


@pytest.mark.parametrize("channel_args", [[], ["--channel", "pre:64KiB"]])
def test_kill_9_broker_clients_keep_mappings_and_a_restart_serves(broker_factory: Any, channel_args: list[str]) -> None:
    before = shm_leftovers()
    broker = broker_factory(*channel_args)
    channel = "pre" if channel_args else "dyn"
    producer = ShmClient.attach(channel, size=None if channel_args else 65536, socket_path=broker.socket)
    consumer = ShmClient.attach(channel, role="consumer", socket_path=broker.socket)
    producer.buf[: len(PAYLOAD)] = PAYLOAD

    os.kill(broker.pid, signal.SIGKILL)
    broker.proc.wait()

    # The mappings outlive the broker: the data is there, nothing crashed.
    assert bytes(consumer.buf[: len(PAYLOAD)]) == PAYLOAD
    producer.buf[0:1] = b"S"
    assert bytes(consumer.buf[:1]) == b"S"
    # The next broker call fails cleanly, with advice.
    with pytest.raises(errors.BrokerUnavailable, match="no broker is listening"):
        ShmClient.attach(channel, role="consumer", socket_path=broker.socket)
    with pytest.raises(errors.BrokerUnavailable):
        ShmClient.status(socket_path=broker.socket)
    producer.close()  # detach is a courtesy: no error when the broker is gone
    consumer.close()
    assert lasting_shm_objects(before) == set(), "a killed broker left names in /dev/shm"

    # A new broker on the same path replaces the stale socket and serves.
    assert os.path.exists(broker.socket)
    again = broker_factory(*channel_args)
    assert again.socket == broker.socket
    with ShmClient.attach(channel, size=None if channel_args else 65536, socket_path=again.socket) as att:
        assert att.generation == 1
        assert bytes(att.buf[: len(PAYLOAD)]) == bytes(len(PAYLOAD))  # a fresh segment, not the old one
    assert lasting_shm_objects(before) == set()


def test_kill_9_broker_mid_handshake_gives_a_clean_client_error(broker_factory: Any) -> None:
    broker = broker_factory()
    os.kill(broker.pid, signal.SIGSTOP)  # accepts nothing, answers nothing
    try:
        import threading

        threading.Timer(0.5, lambda: os.kill(broker.pid, signal.SIGKILL)).start()
        with pytest.raises((errors.BrokerUnavailable, errors.Timeout)):
            ShmClient.attach("x", size=4096, socket_path=broker.socket, timeout=5)
    finally:
        try:
            os.kill(broker.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        broker.proc.wait()
