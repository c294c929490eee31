"""What the broker does to a ring: create its control page, hand out consumer slots.

The control page is a memfd of its own (layout.py), sealed against resizing
so no peer can truncate it and SIGBUS the others; it carries no payload, so
it needs neither the segment's lease nor its backend.  Like every
broker-side access to shared memory this goes through pread(2) and
pwrite(2) on the fd, never through a mapping (see _broker/segments.py).
Values the broker reads back from the control page were written by peers,
so they are sanitised before use.
"""

from __future__ import annotations

import logging
import os

from .._sys import eventfd, fdpass, memfd
from ..errors import ChannelBusy
from . import layout as L
from .ring import MAX_INDEX

log = logging.getLogger(__name__)

# Names of the fds in the Attached message, in SCM_RIGHTS order after "segment".
CONTROL_FD = "ring.control"
PRODUCER_FD = "ring.producer"
CONSUMER_FD = "ring.consumer"


def consumer_fd_name(slot: int) -> str:
    return f"{CONSUMER_FD}{slot}"


def producer_fd_names() -> tuple[str, ...]:
    return (CONTROL_FD, PRODUCER_FD, *(consumer_fd_name(k) for k in range(L.MAX_CONSUMERS)))


CONSUMER_FD_NAMES = (CONTROL_FD, CONSUMER_FD, PRODUCER_FD)


def create_control(payload_size: int, max_message: int) -> int:
    """A fresh control memfd: initialised, mode 0, sealed at CONTROL_SIZE bytes."""
    fd = memfd.memfd_create("shmbroker-ring-control")
    try:
        # Mode 0 like the segments: nobody may reopen it through /proc/PID/fd
        # without CAP_DAC_OVERRIDE, and clients check for it.
        os.fchmod(fd, 0)
        os.ftruncate(fd, L.CONTROL_SIZE)
        os.pwrite(fd, L.init_image(payload_size, max_message), 0)
        memfd.add_seals(fd, memfd.SIZE_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


class RingState:
    """The broker's trusted view of one ring: its control memfd, eventfds, slots, the producer.

    Created and closed with the channel's segment; owns ``fd`` (the control page)."""

    def __init__(self, payload_size: int, max_message: int) -> None:
        self.fd = -1
        self.producer_efd = -1
        self.consumer_efds: list[int] = []
        self.slots: list[object | None] = [None] * L.MAX_CONSUMERS
        self.producer: object | None = None
        try:
            self.fd = create_control(payload_size, max_message)
            self.producer_efd = eventfd.create()
            self.consumer_efds = [eventfd.create() for _ in range(L.MAX_CONSUMERS)]
        except BaseException:
            self.close()
            raise

    def _read_u64(self, offset: int) -> int:
        raw = os.pread(self.fd, 8, offset)
        return L.U64.unpack(raw)[0] if len(raw) == 8 else 0

    def _write_byte(self, offset: int, value: int) -> None:
        os.pwrite(self.fd, bytes([value]), offset)

    def attach_producer(self, session: object, channel: str, describe: str) -> tuple[list[int], tuple[str, ...]]:
        if self.producer is not None and self.producer is not session:
            raise ChannelBusy(
                f"ring channel {channel!r} already has a producer ({describe}); "
                "a ring has one producer at a time: wait for it to detach"
            )
        self.producer = session
        return [self.fd, self.producer_efd, *self.consumer_efds], producer_fd_names()

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
        os.pwrite(self.fd, L.U64.pack(start), L.slot_offset(slot))
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
                os.pwrite(self.fd, L.U64.pack(now), L.slot_offset(slot))
        self.slots[slot] = session
        eventfd.drain(self.consumer_efds[slot])
        return slot, [self.fd, self.consumer_efds[slot], self.producer_efd], CONSUMER_FD_NAMES

    def detach(self, session: object) -> None:
        if self.fd < 0:
            return  # closed with its segment; the fd numbers may be reused already
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
        # Peers keep their own mappings of the control page; without the
        # segment's data it is just indices, freed when the last one unmaps.
        fdpass.close_all([fd for fd in (self.fd, self.producer_efd, *self.consumer_efds) if fd >= 0])
        self.fd = -1
        self.producer_efd = -1
        self.consumer_efds = []
