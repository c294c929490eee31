"""Length-prefixed framing: a 4-byte big-endian length, then that many bytes."""

from __future__ import annotations

import struct

from ..errors import ProtocolError

_LENGTH = struct.Struct(">I")
PREFIX_SIZE = _LENGTH.size


def encode_frame(body: bytes, max_frame_size: int) -> bytes:
    if not body or len(body) > max_frame_size:
        raise ValueError(f"frame body of {len(body)} bytes is outside 1..{max_frame_size}")
    return _LENGTH.pack(len(body)) + body


class FrameDecoder:
    """Accumulates bytes and yields whole frame bodies.

    The length is checked before the body is buffered, so a peer announcing a
    4 GiB frame costs us four bytes, not four gigabytes.
    """

    def __init__(self, max_frame_size: int, max_buffered: int) -> None:
        self._max_frame_size = max_frame_size
        self._max_buffered = max_buffered
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > self._max_buffered:
            raise ProtocolError(
                f"peer sent {len(self._buf)} bytes without waiting for replies "
                f"(at most {self._max_buffered} may be in flight)"
            )

    def has_frame(self) -> bool:
        """Whether :meth:`next_frame` would return a frame (or raise) without more data."""
        if len(self._buf) < PREFIX_SIZE:
            return False
        length: int = _LENGTH.unpack_from(self._buf)[0]
        return length == 0 or length > self._max_frame_size or len(self._buf) >= PREFIX_SIZE + length

    def next_frame(self) -> bytes | None:
        if len(self._buf) < PREFIX_SIZE:
            return None
        (length,) = _LENGTH.unpack_from(self._buf)
        if length == 0 or length > self._max_frame_size:
            raise ProtocolError(f"frame length {length} is outside 1..{self._max_frame_size}")
        end = PREFIX_SIZE + length
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[PREFIX_SIZE:end])
        del self._buf[:end]
        return body
