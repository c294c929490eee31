"""What the broker does to a ring: initialise it, hand out consumer slots, wake peers.

Like every broker-side access to a segment this goes through pread(2) and
pwrite(2) on the fd, never through a mapping (see _broker/segments.py: a
peer that truncates the object must not be able to SIGBUS the broker).
Values the broker reads back from the segment were written by peers, so
they are sanitised before use.
"""

from __future__ import annotations

import logging
import os

from .._layout import HEADER_SIZE
from .._sys import eventfd, fdpass
from ..errors import ChannelBusy
from . import layout as L
from .ring import MAX_INDEX

log = logging.getLogger(__name__)

# Names of the fds in the Attached message, in SCM_RIGHTS order after "segment".
PRODUCER_FD = "ring.producer"
CONSUMER_FD = "ring.consumer"


def consumer_fd_name(slot: int) -> str:
    return f"{CONSUMER_FD}{slot}"


def producer_fd_names() -> tuple[str, ...]:
    return (PRODUCER_FD, *(consumer_fd_name(k) for k in range(L.MAX_CONSUMERS)))


CONSUMER_FD_NAMES = (CONSUMER_FD, PRODUCER_FD)


class RingState:
    """The broker's trusted view of one ring segment: eventfds, slots, the producer."""

    def __init__(self, fd: int, payload_size: int, max_message: int) -> None:
        self.fd = fd
        self.producer_efd = -1
        self.consumer_efds: list[int] = []
        self.slots: list[object | None] = [None] * L.MAX_CONSUMERS
        self.producer: object | None = None
        try:
            self.producer_efd = eventfd.create()
            self.consumer_efds = [eventfd.create() for _ in range(L.MAX_CONSUMERS)]
            os.pwrite(fd, L.init_image(payload_size, max_message), HEADER_SIZE)
        except BaseException:
            self.close()
            raise

    def _read_u64(self, offset: int) -> int:
        raw = os.pread(self.fd, 8, HEADER_SIZE + offset)
        return L.U64.unpack(raw)[0] if len(raw) == 8 else 0

    def _write_byte(self, offset: int, value: int) -> None:
        os.pwrite(self.fd, bytes([value]), HEADER_SIZE + offset)

    def attach_producer(self, session: object, channel: str, describe: str) -> tuple[list[int], tuple[str, ...]]:
        if self.producer is not None and self.producer is not session:
            raise ChannelBusy(
                f"ring channel {channel!r} already has a producer ({describe}); "
                "a ring has one producer at a time: wait for it to detach"
            )
        self.producer = session
        return [self.producer_efd, *self.consumer_efds], producer_fd_names()

    def attach_consumer(self, session: object, channel: str) -> tuple[int, list[int], tuple[str, ...]]:
        try:
            slot = self.slots.index(None)
        except ValueError:
            raise ChannelBusy(
                f"ring channel {channel!r} already has {L.MAX_CONSUMERS} consumers (the most one ring serves); "
                "wait for one to detach"
            ) from None
        # A consumer joining a ring nobody reads starts at the oldest message
        # the producer retained for it; one joining live readers starts at the
        # newest published index.  Both are at or ahead of every index the
        # producer may have cached as its bound, so it never overwrites
        # unread data of the newcomer (docs/ring.md, "joining").
        alone = all(s is None for s in self.slots)
        start = self._read_u64(L.OFF_LOW if alone else L.OFF_WRITE)
        start = min(start - start % L.ALIGN, MAX_INDEX - L.ALIGN)  # peer-written: sanitise
        os.pwrite(self.fd, L.U64.pack(start), HEADER_SIZE + L.slot_offset(slot))
        self._write_byte(L.OFF_SLEEPING + slot, 0)
        self._write_byte(L.OFF_MEMBERS + slot, 1)  # after the cursor: the producer trusts members' cursors
        if alone:
            # The producer may have raised LOW (from the departed consumer's
            # cursor) after we read it; it re-reads the membership after that
            # store, and we re-read LOW after ours: one of us sees the other.
            # The consumer has not been told its slot yet, so moving its
            # cursor forward here is safe.
            now = self._read_u64(L.OFF_LOW)
            now = min(now - now % L.ALIGN, MAX_INDEX - L.ALIGN)
            if now > start:
                os.pwrite(self.fd, L.U64.pack(now), HEADER_SIZE + L.slot_offset(slot))
        self.slots[slot] = session
        eventfd.drain(self.consumer_efds[slot])
        return slot, [self.consumer_efds[slot], self.producer_efd], CONSUMER_FD_NAMES

    def detach(self, session: object) -> None:
        if self.fd < 0:
            return  # closed with its segment; the fd number may be reused already
        if self.producer is session:
            self.producer = None
        for slot, owner in enumerate(self.slots):
            if owner is session:
                self.slots[slot] = None
                try:
                    self._write_byte(L.OFF_MEMBERS + slot, 0)
                    self._write_byte(L.OFF_SLEEPING + slot, 0)
                except OSError as exc:
                    log.warning("could not free consumer slot %d: %s", slot, exc.strerror)
                # No eventfd signal to the producer waiting for this consumer:
                # it re-checks on its own (PRODUCER_RECHECK_SECONDS), and the
                # broker never writes to an eventfd a peer holds (waiting.py).

    def close(self) -> None:
        # Sleepers learn of the revocation by their periodic re-check.
        fdpass.close_all([fd for fd in (self.producer_efd, *self.consumer_efds) if fd >= 0])
        self.producer_efd = -1
        self.consumer_efds = []
        self.fd = -1  # owned by the Segment, which closes it
