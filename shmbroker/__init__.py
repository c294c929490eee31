"""shmbroker: a secure shared-memory IPC broker for Linux.

The public API is :class:`ShmClient`, the :class:`Attachment` it returns,
the types :data:`Role` and :class:`Status` (with the parts of a status:
:class:`StatusBroker`, :class:`StatusChannel`, :class:`StatusPeer`,
:class:`StatusEvent`), and the exceptions in :mod:`shmbroker.errors`; every
other module is private and may change without notice.

>>> with ShmClient.attach("frames", "producer", size=1 << 20) as seg:  # doctest: +SKIP
...     seg.buf[:5] = b"hello"
"""

from __future__ import annotations

from . import errors
from ._client import Attachment, ShmClient
from ._types import Role, Status, StatusBroker, StatusChannel, StatusEvent, StatusPeer

__all__ = [
    "Attachment",
    "Role",
    "ShmClient",
    "Status",
    "StatusBroker",
    "StatusChannel",
    "StatusEvent",
    "StatusPeer",
    "errors",
]
__version__ = "0.1.0"
