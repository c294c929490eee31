"""The mechanisms shmbroker is measured against, one module each.

Modules load only when a bench runs, so building the command line (which
every `shmbroker serve` does) never imports multiprocessing or a peer library.
"""

from __future__ import annotations

import importlib

from .base import Lane, Peer, Receiver, RunContext, Sender

# Order is the order of table rows and plot legends: shmbroker first, then
# from the most common choice to the most specialised.
_REGISTRY: dict[str, tuple[str, str]] = {
    "shmbroker": ("shmbroker_ring", "ShmbrokerRingPeer"),
    "pipe": ("pipe", "PipePeer"),
    "unix": ("unix_socket", "UnixSocketPeer"),
    "mp-queue": ("mp_queue", "MpQueuePeer"),
    "shared-memory": ("shared_memory", "SharedMemoryPeer"),
    "faster-fifo": ("faster_fifo", "FasterFifoPeer"),
    "zmq": ("zmq_ipc", "ZmqPeer"),
    "iceoryx2": ("iox2", "Iceoryx2Peer"),
}
PEER_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def load(name: str) -> type[Peer]:
    module, cls = _REGISTRY[name]
    peer: type[Peer] = getattr(importlib.import_module(f".{module}", __name__), cls)
    assert peer.name == name, f"peer module {module} names itself {peer.name!r}"
    return peer


__all__ = ["PEER_NAMES", "Lane", "Peer", "Receiver", "RunContext", "Sender", "load"]
