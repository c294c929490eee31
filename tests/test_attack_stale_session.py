"""A session left on a revoked segment must not keep the next one alive
(found by the outside red team of issue 12; docs/attacks.md, A6 wipes).

After a revocation (panic, lease break, truncation, identity change) the
peers of the old segment stay connected with their revoked attachments.  They
used to keep counting as peers of the channel: the next segment was then
neither wiped at its last detach nor when its last producer left
(``wipe_when = "producer_gone"``), so its secret outlived the promise.  Any
consumer able to truncate a posix segment could set this up for a producer.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any


from adversary import wait_until, write_config
from shmbroker import ShmClient

SECRET = b"TOPSECRET"


def _broker(broker_factory: Any, tmp: Path, wipe_when: str) -> Any:
    config = (
        "[status]\nuids = [0]\n"
        f'[channels.secret]\nsize = "1MiB"\nwipe_when = "{wipe_when}"\n'
        "[[rules]]\nuids = [0]\n"
    )
    return broker_factory("--config", write_config(tmp, config))


def _revoke_with_a_stale_peer(broker: Any) -> Any:
    """A producer whose segment the operator's panic revokes; it stays connected."""
    stale = ShmClient.attach("secret", "producer", socket_path=broker.socket)
    broker.proc.send_signal(signal.SIGUSR1)
    wait_until(lambda: stale.revoked, what="the panic wipe")
    return stale


def test_the_last_producer_leaving_wipes_even_with_a_stale_producer_connected(broker_factory: Any, short_tmp: Path) -> None:
    broker = _broker(broker_factory, short_tmp, "producer_gone")
    stale = _revoke_with_a_stale_peer(broker)
    try:
        producer = ShmClient.attach("secret", "producer", socket_path=broker.socket)
        assert producer.generation == 2
        producer.buf[: len(SECRET)] = SECRET
        with ShmClient.attach("secret", "consumer", socket_path=broker.socket) as consumer:
            assert bytes(consumer.buf[: len(SECRET)]) == SECRET
            producer.close()  # the last producer of generation 2 leaves
            wait_until(lambda: consumer.revoked, timeout=5, what="the producer_gone revocation")
            # The revoked word is set at once; the bytes are wiped in steps
            # scheduled after it (core.py, _revoke), so wait for those too.
            wait_until(lambda: bytes(consumer.buf[: len(SECRET)]) == bytes(len(SECRET)), timeout=5,
                       what="the producer_gone wipe")
    finally:
        stale.close()


def test_the_last_detach_wipes_even_with_a_stale_peer_connected(broker_factory: Any, short_tmp: Path) -> None:
    broker = _broker(broker_factory, short_tmp, "never")
    stale = _revoke_with_a_stale_peer(broker)
    try:
        producer = ShmClient.attach("secret", "producer", socket_path=broker.socket)
        producer.buf[: len(SECRET)] = SECRET
        producer.close()  # the last peer of generation 2 leaves
        with ShmClient.attach("secret", "consumer", socket_path=broker.socket) as late:
            assert late.generation == 3, "the segment outlived its last peer"
            assert bytes(late.buf[: len(SECRET)]) == bytes(len(SECRET))
        peers = broker.status()["channels"][0]["peers"]
        assert [(p["role"], p["revoked"]) for p in peers] == [("producer", True)]
    finally:
        stale.close()
