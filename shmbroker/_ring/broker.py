"""What the broker does to a ring: create its pages, hand out consumer slots and cursor pages.

The index page, the control page and every consumer's cursor page are
memfds of their own (layout.py), sealed against resizing so no peer can
truncate them and SIGBUS the others; they carry no payload, so they need
neither the segment's lease nor its backend.  Consumers get an O_RDONLY fd
of the index page, so the indices they trust can only come from the
producer and the broker.  Each consumer attachment gets a fresh cursor
page that only it, the broker and the ring's producer (on request,
:meth:`RingState.cursor_pages`) ever hold, so no other consumer can move
its cursor (docs/attacks.md, A6).  Like every
broker-side access to shared memory this goes through pread(2) and
pwrite(2) on the fd, never through a mapping (see _broker/segments.py).
Values the broker reads back from the index page were written by the
producer, so they are sanitised before use.
"""

from __future__ import annotations

import logging
import os

from .._sys import eventfd, fdpass, memfd
from ..errors import ChannelBusy, PermissionDenied
from . import layout as L
from .layout import CONSUMER_FD_NAMES, producer_fd_names
from .ring import MAX_INDEX

log = logging.getLogger(__name__)

def _create_page(name: str, image: bytes, *, readonly_fd: bool) -> tuple[int, int]:
    """A fresh memfd holding ``image``, mode 0, sealed at its size; with
    ``readonly_fd`` also an O_RDONLY fd of it (else -1)."""
    fd = memfd.memfd_create(name)
    ro = -1
    try:
        if readonly_fd:
            # Like Segment._create_memfd: reopened through /proc before the
            # fchmod, since a hardened broker has no CAP_DAC_OVERRIDE to open
            # a mode-0 file (which is the point of mode 0).
            ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        # Mode 0 like the segments: nobody may reopen it through /proc/PID/fd
        # without CAP_DAC_OVERRIDE, and clients check for it.
        os.fchmod(fd, 0)
        os.ftruncate(fd, len(image))
        os.pwrite(fd, image, 0)
        memfd.add_seals(fd, memfd.SIZE_SEALS)
    except BaseException:
        fdpass.close_all([f for f in (fd, ro) if f >= 0])
        raise
    return fd, ro


def create_control() -> int:
    """A fresh control memfd (the sleeping flags): zeroed, mode 0, sealed at CONTROL_SIZE bytes."""
    return _create_page("shmbroker-ring-control", bytes(L.CONTROL_SIZE), readonly_fd=False)[0]


def create_cursor(start: int) -> int:
    """A fresh cursor memfd for one consumer attachment, holding ``start``: mode 0, sealed at CURSOR_SIZE bytes."""
    image = bytearray(L.CURSOR_SIZE)
    L.U64.pack_into(image, L.OFF_CURSOR, start)
    return _create_page("shmbroker-ring-cursor", bytes(image), readonly_fd=False)[0]


def create_index(payload_size: int, max_message: int) -> tuple[int, int]:
    """A fresh index memfd (static header, indices), mode 0, sealed at
    INDEX_SIZE bytes, and an O_RDONLY fd of it for consumers."""
    return _create_page("shmbroker-ring-index", L.init_image(payload_size, max_message), readonly_fd=True)


class RingState:
    """The broker's trusted view of one ring: its pages, eventfds, slots, the producer.

    Created and closed with the channel's segment; owns ``fd`` (the control
    page), ``index_fd`` (the index page), ``index_ro_fd`` (its read-only
    twin for consumers) and ``cursor_fds`` (each attached consumer's cursor
    page)."""

    def __init__(self, payload_size: int, max_message: int) -> None:
        self.fd = -1
        self.index_fd = -1
        self.index_ro_fd = -1
        self.producer_efd = -1
        self.consumer_efds: list[int] = []
        self.slots: list[object | None] = [None] * L.MAX_CONSUMERS
        # The read index each slot's consumer starts at, for the attach reply.
        self.starts: list[int] = [0] * L.MAX_CONSUMERS
        # Each attached consumer's cursor page and the serial of its attach
        # (the producer trusts a page only under the serial the index page shows).
        self.cursor_fds: list[int] = [-1] * L.MAX_CONSUMERS
        self.serials: list[int] = [0] * L.MAX_CONSUMERS
        self._last_serial = 0
        self._generation = 0
        self.producer: object | None = None
        try:
            self.fd = create_control()
            self.index_fd, self.index_ro_fd = create_index(payload_size, max_message)
            self.producer_efd = eventfd.create()
            self.consumer_efds = [eventfd.create() for _ in range(L.MAX_CONSUMERS)]
        except BaseException:
            self.close()
            raise

    def _read_index(self, offset: int) -> int:
        """A word of the index page: written by the producer, so sanitised into an aligned index."""
        raw = os.pread(self.index_fd, 8, offset)
        value = L.U64.unpack(raw)[0] if len(raw) == 8 else 0
        return min(value - value % L.ALIGN, MAX_INDEX - L.ALIGN)

    @staticmethod
    def _write_byte(fd: int, offset: int, value: int) -> None:
        os.pwrite(fd, bytes([value]), offset)

    def attach_producer(self, session: object, channel: str, describe: str) -> tuple[list[int], tuple[str, ...]]:
        if self.producer is not None and self.producer is not session:
            raise ChannelBusy(
                f"ring channel {channel!r} already has a producer ({describe}); "
                "a ring has one producer at a time: wait for it to detach"
            )
        self.producer = session
        return [self.fd, self.index_fd, self.producer_efd, *self.consumer_efds], producer_fd_names()

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
        start = self._read_index(L.OFF_LOW if alone else L.OFF_WRITE)
        cursor_fd = create_cursor(start)
        try:
            self._last_serial += 1
            serial = self._last_serial
            # The start first: until the producer fetched the new cursor page
            # it bounds itself by this (the consumer never reads below it),
            # and it never trusts an older page under the new serial.
            os.pwrite(self.index_fd, L.U64.pack(start), L.start_offset(slot))
            os.pwrite(self.index_fd, L.U64.pack(serial), L.serial_offset(slot))
            self._write_byte(self.fd, L.OFF_SLEEPING + slot, 0)
            self._write_byte(self.index_fd, L.OFF_MEMBERS + slot, 1)
            self._bump_generation()
            if alone:
                # The producer may have raised LOW (from the departed consumer's
                # cursor) after we read it; it re-reads the generation after that
                # store, and we re-read LOW after bumping it: one of us sees the
                # other.  The consumer has not been told its slot yet, so moving
                # its start forward here is safe (a producer that read the old
                # one is only more careful).
                now = self._read_index(L.OFF_LOW)
                if now > start:
                    os.pwrite(cursor_fd, L.U64.pack(now), L.OFF_CURSOR)
                    os.pwrite(self.index_fd, L.U64.pack(now), L.start_offset(slot))
                    start = now
        except BaseException:
            os.close(cursor_fd)
            raise
        self.starts[slot] = start
        self.slots[slot] = session
        self.cursor_fds[slot] = cursor_fd
        self.serials[slot] = serial
        eventfd.drain(self.consumer_efds[slot])
        fds = [self.fd, self.index_ro_fd, cursor_fd, self.consumer_efds[slot], self.producer_efd]
        return slot, fds, CONSUMER_FD_NAMES

    def _bump_generation(self) -> None:
        """Tell the producer the membership changed: after the words it covers,
        so a producer that reads the same generation before and after its scan
        saw one consistent membership (no detach + reattach in between)."""
        self._generation += 1
        os.pwrite(self.index_fd, L.U64.pack(self._generation), L.OFF_MEMBER_GEN)

    def cursor_pages(self, session: object, channel: str) -> tuple[list[int], list[int], list[int]]:
        """(slots, serials, fds) of every attached consumer's cursor page, for the ring's producer only."""
        if session is not self.producer or self.fd < 0:
            raise PermissionDenied(
                f"permission denied: only the producer attached to ring channel {channel!r} "
                "may fetch its consumers' cursor pages"
            )
        # A slot has a cursor page exactly while a consumer holds it.
        slots = [k for k in range(L.MAX_CONSUMERS) if self.cursor_fds[k] >= 0]
        return slots, [self.serials[k] for k in slots], [self.cursor_fds[k] for k in slots]

    def detach(self, session: object) -> None:
        if self.fd < 0:
            return  # closed with its segment; the fd numbers may be reused already
        if self.producer is session:
            self.producer = None
        for slot, owner in enumerate(self.slots):
            if owner is session:
                self.slots[slot] = None
                try:
                    self._write_byte(self.index_fd, L.OFF_MEMBERS + slot, 0)
                    self._write_byte(self.fd, L.OFF_SLEEPING + slot, 0)
                    self._bump_generation()
                except OSError as exc:
                    log.warning("could not free consumer slot %d: %s", slot, exc.strerror)
                # The consumer and the producer keep their mappings of the
                # page; the next occupant of the slot gets a fresh one.
                fdpass.close_all([self.cursor_fds[slot]])
                self.cursor_fds[slot] = -1
                # No eventfd signal to the producer waiting for this consumer:
                # it re-checks on its own (PRODUCER_RECHECK_SECONDS), and the
                # broker never writes to an eventfd a peer holds (waiting.py).

    def close(self) -> None:
        # Sleepers learn of the revocation by their periodic re-check.
        # Peers keep their own mappings of the pages; without the segment's
        # data they are just indices, freed when the last one unmaps.
        fds = (self.fd, self.index_fd, self.index_ro_fd, self.producer_efd, *self.consumer_efds, *self.cursor_fds)
        fdpass.close_all([fd for fd in fds if fd >= 0])
        self.fd = self.index_fd = self.index_ro_fd = -1
        self.cursor_fds = [-1] * L.MAX_CONSUMERS
        self.producer_efd = -1
        self.consumer_efds = []
