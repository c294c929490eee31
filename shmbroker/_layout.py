"""The segment header every peer agrees on.

A segment is one header page followed by the payload.  The broker writes the
header with pwrite(2) and never through a mapping (a peer that truncates the
object would otherwise kill the broker with SIGBUS); clients read it through
their mapping.  Little-endian, 8-byte aligned words so a client can read the
revoked word with one aligned load.

    offset size field
    0      8    magic            b"SHMBRK\\x00\\x01"
    8      4    layout version   1
    12     4    flags            bit 0: the payload holds a message ring
    16     8    payload size     bytes after the header page
    24     8    generation       bumps each time a channel gets a new segment
    32     8    revoked          non-zero once the broker revoked the segment
    40     8    payload offset   PAGE_SIZE
"""

from __future__ import annotations

import dataclasses
import struct

from .limits import PAGE_SIZE

MAGIC = b"SHMBRK\x00\x01"
LAYOUT_VERSION = 1
HEADER_SIZE = PAGE_SIZE
FLAG_RING = 1 << 0

_HEADER = struct.Struct("<8sIIQQQQ")
REVOKED_OFFSET = 32
REVOKED = struct.Struct("<Q")


@dataclasses.dataclass(frozen=True)
class Header:
    size: int
    generation: int
    flags: int = 0
    revoked: bool = False
    version: int = LAYOUT_VERSION

    def pack(self) -> bytes:
        return _HEADER.pack(
            MAGIC, self.version, self.flags, self.size, self.generation, int(self.revoked), HEADER_SIZE
        )


def parse_header(buf: bytes | memoryview) -> Header | None:
    """The header in ``buf``, or None when it is not a live shmbroker header
    (wiped to zeros, or never initialised)."""
    magic, version, flags, size, generation, revoked, offset = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC or offset != HEADER_SIZE:
        return None
    return Header(size=size, generation=generation, flags=flags, revoked=bool(revoked), version=version)


def segment_length(payload_size: int) -> int:
    """Bytes of the whole object: header page plus payload rounded up to a page."""
    pages = -(-payload_size // PAGE_SIZE)
    return HEADER_SIZE + pages * PAGE_SIZE
