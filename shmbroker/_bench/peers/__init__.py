"""The mechanisms shmbroker is measured against, one module each."""

from __future__ import annotations

from .base import Lane, Peer, Receiver, RunContext, Sender
from .faster_fifo import FasterFifoPeer
from .iox2 import Iceoryx2Peer
from .mp_queue import MpQueuePeer
from .pipe import PipePeer
from .shared_memory import SharedMemoryPeer
from .shmbroker_ring import ShmbrokerRingPeer
from .unix_socket import UnixSocketPeer
from .zmq_ipc import ZmqPeer

# Registry order is the order of table columns and plot legends:
# shmbroker first, then from the most common choice to the most specialised.
PEERS: dict[str, type[Peer]] = {
    cls.name: cls
    for cls in (
        ShmbrokerRingPeer,
        PipePeer,
        UnixSocketPeer,
        MpQueuePeer,
        SharedMemoryPeer,
        FasterFifoPeer,
        ZmqPeer,
        Iceoryx2Peer,
    )
}

__all__ = ["PEERS", "Lane", "Peer", "Receiver", "RunContext", "Sender"]
