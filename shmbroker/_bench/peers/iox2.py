"""iceoryx2's Python binding: zero-copy publish/subscribe over named shared memory.

Its Python API has no blocking receive for publish/subscribe, so the
subscriber polls and yields the CPU between empty polls; that cost shows
in its CPU seconds per message.  The subscriber copies every payload out,
as every other peer's consumer does.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import time
from pathlib import Path
from typing import Any

from .base import Lane, Peer, Receiver, Sender

# Depth of the subscriber's queue: the same eight messages in flight as the
# other bounded peers.
DEPTH = 8
# Each side waits this long for the other to create its port.
CONNECT_WAIT = 20.0


def _node(root: Path, prefix: str) -> Any:
    import iceoryx2 as iox2

    config = iox2.config.default()
    # Our own prefix and root: every file this run makes in /dev/shm and on
    # disk is then ours to remove, and never another user's iox2_* files.
    config.global_cfg.prefix = iox2.FileName.new(prefix)
    config.global_cfg.root_path = iox2.Path.new(f"{root}/")
    builder = iox2.NodeBuilder.new().config(config).signal_handling_mode(iox2.SignalHandlingMode.Disabled)
    return builder.create(iox2.ServiceType.Ipc)


def _service(node: Any, name: str) -> Any:
    import iceoryx2 as iox2

    return (
        node.service_builder(iox2.ServiceName.new(name))
        .publish_subscribe(iox2.Slice[ctypes.c_uint8])
        .enable_safe_overflow(False)
        .subscriber_max_buffer_size(DEPTH)
        .open_or_create()
    )


def _wait_for(count: Any, what: str) -> None:
    deadline = time.monotonic() + CONNECT_WAIT
    while count() < 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} appeared on the iceoryx2 service within {CONNECT_WAIT:g} s")
        time.sleep(0.001)


class _Publish(Sender):
    def __init__(self, node: Any, service: Any, size: int) -> None:
        import iceoryx2 as iox2

        self.node = node
        self.service = service
        self.publisher = (
            service.publisher_builder()
            .initial_max_slice_len(size)
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )
        # Connect before the measurement: samples sent while a connection is
        # still being set up are dropped even with overflow disabled (seen
        # with 0.10; iceoryx2 issues #305 and #1697 describe relatives).
        _wait_for(lambda: service.dynamic_config.number_of_subscribers, "subscriber")
        self.publisher.update_connections()

    def send(self, data: memoryview) -> None:
        n = len(data)
        sample = self.publisher.loan_slice_uninit(n)
        src = (ctypes.c_char * n).from_buffer(data)
        ctypes.memmove(sample.payload_ptr, src, n)
        del src
        sample.assume_init().send()

    def close(self) -> None:
        self.publisher.delete()
        self.service = None
        self.node = None


class _Subscribe(Receiver):
    def __init__(self, node: Any, service: Any, size: int) -> None:
        self.node = node
        self.service = service
        self.subscriber = service.subscriber_builder().buffer_size(DEPTH).create()
        _wait_for(lambda: service.dynamic_config.number_of_publishers, "publisher")
        # Nothing is sent before the harness says go; this receive only
        # makes the subscriber connect to the publisher now.
        if self.subscriber.receive() is not None:
            raise RuntimeError("a sample arrived before the measurement started")
        self.size = size
        self._dst: Any = None
        self._buf: bytearray | None = None

    def recv_into(self, buf: bytearray) -> int:
        receive = self.subscriber.receive
        sample = receive()
        while sample is None:
            os.sched_yield()
            sample = receive()
        n = sample.header.number_of_elements
        if self._buf is not buf:
            self._buf = buf
            self._dst = (ctypes.c_char * len(buf)).from_buffer(buf)
        ctypes.memmove(self._dst, sample.payload_ptr, min(n, len(buf)))
        sample.delete()
        return int(n)

    def close(self) -> None:
        self._dst = None
        self.subscriber.delete()
        self.service = None
        self.node = None


class _IoxLane(Lane):
    def __init__(self, root: Path, prefix: str, name: str, size: int) -> None:
        self.root = root
        self.prefix = prefix
        self.name = name
        self.size = size

    def open_sender(self) -> Sender:
        node = _node(self.root, self.prefix)
        return _Publish(node, _service(node, self.name), self.size)

    def open_receiver(self) -> Receiver:
        node = _node(self.root, self.prefix)
        return _Subscribe(node, _service(node, self.name), self.size)


class Iceoryx2Peer(Peer):
    name = "iceoryx2"
    description = f"iceoryx2 publish/subscribe (Slice[c_uint8], queue {DEPTH}, no overflow, retry until delivered); subscriber polls"

    def __init__(self) -> None:
        self.root = Path("/tmp")
        self.prefix = "shmbench_"
        self.count = 0

    def available(self) -> str | None:
        if importlib.util.find_spec("iceoryx2") is None:
            return "iceoryx2 is not installed (pip install 'shmbroker[bench]')"
        return None

    def start(self, ctx: Any) -> None:
        self.root = ctx.tmpdir / "iceoryx2"
        self.root.mkdir(exist_ok=True)
        self.prefix = f"{ctx.tag}iox_"
        import iceoryx2 as iox2

        iox2.set_log_level_from_env_or(iox2.LogLevel.Error)

    def lane(self, size: int, index: int) -> Lane:
        self.count += 1
        return _IoxLane(self.root, self.prefix, f"shmbench/lane{self.count}", size)
