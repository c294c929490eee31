"""shmbroker's message ring: a producer and a consumer attached to one channel.

The harness starts a private broker; each worker attaches through it (the
broker authenticates it and hands over the segment), then messages move
through the shared ring without the broker on the data path.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

from ...limits import PAGE_SIZE
from ..broker import TempBroker
from .base import Lane, Peer, Receiver, Sender

# Eight messages in flight, as every other bounded peer gets.
DEPTH = 8
# Per-message bookkeeping a ring may keep next to each payload; generous, so
# the ring never holds fewer than DEPTH messages whatever its record format.
RECORD_OVERHEAD = 64
# The smallest data area a ring accepts (one page).  The whole payload is
# data: the ring's indices live in pages of their own (docs/ring.md).
MIN_DATA = PAGE_SIZE
# A consumer may start before its producer created the channel.
ATTACH_WAIT = 10.0


def ring_size(message: int) -> int:
    """Payload bytes of a ring channel holding DEPTH messages of this size."""
    return max(MIN_DATA, DEPTH * (message + RECORD_OVERHEAD))


def _blocking(method: Any) -> dict[str, Any]:
    """Pass timeout=None when the ring's call takes one: block, never time out."""
    try:
        return {"timeout": None} if "timeout" in inspect.signature(method).parameters else {}
    except (TypeError, ValueError):
        return {}


class _RingSend(Sender):
    def __init__(self, att: Any) -> None:
        self.att = att
        self._send = att.send
        self._kw = _blocking(att.send)

    def send(self, data: memoryview) -> None:
        self._send(data, **self._kw)

    def close(self) -> None:
        self.att.close()


class _RingRecv(Receiver):
    def __init__(self, att: Any) -> None:
        self.att = att
        self._recv_into = att.recv_into
        self._kw = _blocking(att.recv_into)

    def recv_into(self, buf: bytearray) -> int:
        return int(self._recv_into(buf, **self._kw))

    def close(self) -> None:
        self.att.close()


class _RingLane(Lane):
    def __init__(self, socket_path: str, channel: str, size: int) -> None:
        self.socket_path = socket_path
        self.channel = channel
        self.size = size

    def open_sender(self) -> Sender:
        from ... import ShmClient

        att = ShmClient.attach(
            self.channel,
            "producer",
            socket_path=self.socket_path,
            size=ring_size(self.size),
            ring=True,
            max_message=self.size,
        )
        return _RingSend(att)

    def open_receiver(self) -> Receiver:
        from ... import ShmClient, errors

        deadline = time.monotonic() + ATTACH_WAIT
        while True:
            try:
                att = ShmClient.attach(self.channel, "consumer", socket_path=self.socket_path)
                return _RingRecv(att)
            except errors.ChannelNotFound:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)


class ShmbrokerRingPeer(Peer):
    name = "shmbroker"
    description = f"shmbroker message ring through a private broker (depth {DEPTH}); send / recv_into"

    def __init__(self) -> None:
        self.broker: TempBroker | None = None
        self.count = 0

    def available(self) -> str | None:
        from ... import Attachment

        if not hasattr(Attachment, "send") or not hasattr(Attachment, "recv_into"):
            return "needs the message ring (issue 3): this shmbroker's Attachment has no send/recv_into"
        return None

    def start(self, ctx: Any) -> None:
        directory = ctx.tmpdir / "ring-broker"
        directory.mkdir(mode=0o700)
        self.broker = TempBroker(directory)

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def helper_cpu_seconds(self) -> float | None:
        # The broker should be idle while messages flow; if it is not, that
        # CPU is part of what each message costs.
        return self.broker.cpu_seconds() if self.broker is not None else None

    def lane(self, size: int, index: int) -> Lane:
        assert self.broker is not None, "start() first"
        self.count += 1
        return _RingLane(self.broker.socket, f"bench-ring-{self.count}", size)
