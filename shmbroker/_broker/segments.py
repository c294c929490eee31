"""Segments: unlinked, leased shared-memory objects only the broker can vouch for.

Creation order (each step is what makes the next one meaningful):
1. shm_open(O_CREAT|O_EXCL, mode 0) under an unguessable name;
2. shm_unlink at once, so the name exists only for this window;
3. F_SETLEASE(F_WRLCK): granted only if no other open exists, which proves
   nobody opened the object during the window; otherwise it is discarded;
4. ftruncate and write the header.

The broker never reads or writes segment memory through a mapping: a peer
holding the fd could ftruncate the object and the next access would SIGBUS
the whole broker, which Python cannot recover from.  pwrite(2) on a short
file merely extends it, so all broker-side writes (header, wipes) go through
the fd.

Two backends (docs/attacks.md, A6):
* ``posix``: the object above.  Its lease detects anyone who open()s it
  (/proc/PID/fd), but shm objects cannot be sealed: any peer holding the
  fd (consumers too: they cannot get a read-only one) can ftruncate() it
  (ftruncate on an fd does not break a lease).  A peer touching its mapping
  past the new end gets SIGBUS; the client's guard (_sys/sigbus.py) turns
  that into zero pages and a revoked segment instead of a crash.  The
  broker notices on its next tick (:meth:`Segment.truncated`), wipes (which
  restores the size) and revokes for everyone.
* ``memfd``: memfd_create + F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL, so nobody
  can change its size and no peer can SIGBUS another; clients refuse a
  memfd without those seals.  A memfd cannot take a lease, so an open of
  /proc/PID/fd/N by root (or a ptrace-capable same-uid process) goes
  unnoticed.

Segments are never sparse (docs/attacks.md, "full /dev/shm"): pages of a
sparse tmpfs file are allocated on first touch, so with /dev/shm full that
touch is a SIGBUS in whichever client made it.  :meth:`Segment.reserve`
allocates every page with fallocate(2) before the segment is handed out
(ENOSPC there is a refusal, not a crash), and wipes write zeros into those
reserved pages, which needs no free space.  Both work in steps so the
broker's loop can interleave a 1 GiB segment with serving everyone else
(work.py).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable

from .._layout import HEADER_SIZE, REVOKED, REVOKED_OFFSET, Header, segment_length
from .._sys import falloc, lease, memfd, shm

log = logging.getLogger(__name__)

# Retries when an attacker pre-creates our (128-bit random) name, or the
# lease shows someone opened it in the window.  Either is already an attack;
# a handful of retries keeps the broker serving without spinning forever.
MAX_CREATE_ATTEMPTS = 8
# Bytes reserved, zeroed or freed in one step.  One step is the most one
# segment's work can add to another peer's wait (scheduler.py runs at least
# one task per uid and round), so it stays well below a millisecond of
# kernel work: allocating, zeroing or freeing 1 MiB of tmpfs pages.
STEP_BYTES = 256 << 10
_ZEROS = bytes(STEP_BYTES)


class LeaseUnavailable(Exception):
    """The object was opened by someone else before we could lease it."""


class Segment:
    """One shared-memory object owned by the broker."""

    def __init__(self, fd: int, size: int, generation: int, flags: int = 0, backend: str = "posix") -> None:
        self.fd = fd
        self.size = size
        self.length = segment_length(size)
        self.generation = generation
        self.flags = flags
        self.backend = backend
        self.revoked = False
        # memfd only: an O_RDONLY fd of the same object for consumers (raw
        # and ring: a ring's cursors live in its own control memfd), who then
        # cannot map it writable or write to it at all.
        # A posix object cannot have one: any second open, ours included,
        # makes the write lease impossible.
        self.readonly_fd = -1
        # Payload bytes (after the header page) reserved so far; ready once
        # all are.  The header page is allocated by writing the header.
        self._reserved = 0
        # Bytes of the object wiped so far by a wipe in progress (None: no wipe).
        self._wiped: int | None = None
        # How the payload is wiped: punched (pages freed) or overwritten with
        # zeros (pages kept, see begin_wipe).
        self._free = False

    @classmethod
    def create(
        cls, size: int, generation: int, *, backend: str = "posix", flags: int = 0,
        on_lease_failure: Callable[[], None] | None = None,
    ) -> Segment:
        if backend == "memfd":
            return cls._create_memfd(size, generation, flags)
        if backend != "posix":
            raise ValueError(f"unknown segment backend {backend!r}")
        for _ in range(MAX_CREATE_ATTEMPTS):
            name = "/shmbroker-" + secrets.token_hex(16)
            try:
                fd = shm.shm_open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0)
            except FileExistsError:
                log.warning("segment name %s already exists; someone is squatting names, retrying", name)
                continue
            try:
                shm.shm_unlink(name)
            except OSError:
                os.close(fd)
                raise
            try:
                lease.take_write_lease(fd)
            except OSError as exc:
                os.close(fd)
                log.warning("segment %s was opened by another process before it could be leased (%s); discarded", name, exc.strerror)
                if on_lease_failure is not None:
                    on_lease_failure()
                continue
            segment = cls(fd, size, generation, flags)
            try:
                os.ftruncate(fd, segment.length)
                segment._write_header()
            except BaseException:
                segment.close()
                raise
            return segment
        raise OSError("could not create a private segment after several attempts (see warnings above)")

    @classmethod
    def _create_memfd(cls, size: int, generation: int, flags: int) -> Segment:
        fd = memfd.memfd_create("shmbroker")
        segment = cls(fd, size, generation, flags, backend="memfd")
        try:
            # Reopening through /proc/self/fd makes a new, read-only open
            # file description (memfds have no lease to break).  Before the
            # fchmod: a hardened broker has no CAP_DAC_OVERRIDE to open a
            # mode-0 file, which is the point of mode 0.
            segment.readonly_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            # Mode 0 like the posix objects: nobody may open it by path, and
            # clients check the mode the same way for both backends.
            os.fchmod(fd, 0)
            os.ftruncate(fd, segment.length)
            segment._write_header()
            memfd.add_seals(fd, memfd.SIZE_SEALS)
        except BaseException:
            segment.close()
            raise
        return segment

    def _write_header(self) -> None:
        header = Header(size=self.size, generation=self.generation, flags=self.flags, revoked=self.revoked)
        os.pwrite(self.fd, header.pack(), 0)

    def lease_intact(self) -> bool:
        if self.backend == "memfd":
            return True  # memfds cannot be leased; their seals are the defence
        try:
            return lease.holds_write_lease(self.fd)
        except OSError:
            return False

    def truncated(self) -> bool:
        """A peer changed the object's size (only possible without seals)."""
        try:
            return os.fstat(self.fd).st_size != self.length
        except OSError:
            return True

    @property
    def ready(self) -> bool:
        """Every page is reserved: the segment may be handed out."""
        return self._reserved >= self.length - HEADER_SIZE

    def reserve(self, budget: int = STEP_BYTES) -> bool:
        """Reserve up to ``budget`` more bytes of pages; True once all are.

        Raises OSError (ENOSPC, ENOMEM) when the memory is not there: the
        caller refuses the attach and closes the segment, which frees what
        was reserved."""
        todo = min(budget, self.length - HEADER_SIZE - self._reserved)
        if todo > 0:
            falloc.reserve(self.fd, HEADER_SIZE + self._reserved, todo)
            self._reserved += todo
        return self.ready

    def begin_wipe(self, *, free: bool) -> str | None:
        """Mark the segment revoked for every mapping; return a problem, or None.

        The revoked word is non-zero before any byte is wiped and stays so: a
        ring consumer copies a message and then checks the word, so a copy
        that raced with the wipe is never delivered (docs/ring.md).

        ``free``: punch the payload's pages out instead of overwriting them.
        Freeing is what keeps the final close() cheap (closing the last
        reference to 1 GiB of pages frees them all in that one call, a stall
        of a tenth of a second), but a peer that still maps the segment would
        then need a fresh page on its next read of it, which is a SIGBUS when
        /dev/shm is full.  So segments that attached peers may still read are
        overwritten (their pages are freed by the peers' own munmap later),
        and only those nobody is attached to any more are punched.

        Never raises: a wipe is what the broker does when something went wrong."""
        if self._wiped is not None:
            return None
        self._wiped = 0
        self._free = free
        self.revoked = True
        problem = None
        try:
            if os.fstat(self.fd).st_size != self.length:
                # A peer truncated (or grew) an unsealable posix object.
                # Restoring the size allocates nothing (the file is sparse
                # again where it was cut), and mappings that were not cut
                # then read instead of faulting.
                os.ftruncate(self.fd, self.length)
        except OSError as exc:
            problem = f"could not restore the size of a truncated segment: {exc.strerror or exc}"
        try:
            os.pwrite(self.fd, REVOKED.pack(1), REVOKED_OFFSET)
        except OSError as exc:
            # Only when a truncation freed the header page and /dev/shm is
            # full: then nothing of the segment is left there to protect.
            problem = f"could not set the revoked word: {exc.strerror or exc}"
        return problem

    def wipe_step(self, budget: int = STEP_BYTES) -> bool:
        """Wipe up to ``budget`` more bytes; True once the wipe is complete.

        Zeros go into the pages reserved at creation, so they need no free
        space; where a truncation freed pages and a write would need new
        ones, the range is punched instead.  The header page is always
        overwritten, around the revoked word, which stays set.  Never raises."""
        if self._wiped is None:
            self.begin_wipe(free=False)
        assert self._wiped is not None
        if self.fd < 0:
            return True  # closed meanwhile (the wipe was finished at once)
        spans = ((HEADER_SIZE, self.length), (0, REVOKED_OFFSET), (REVOKED_OFFSET + REVOKED.size, HEADER_SIZE))
        done = self._wiped
        for index, (start, end) in enumerate(spans):
            if done >= end - start:
                done -= end - start
                continue
            todo = min(budget, end - start - done)
            if index == 0 and self._free:
                _punch(self.fd, start + done, todo)
            else:
                _zero(self.fd, start + done, todo)
            self._wiped += todo
            return False
        return True

    def wipe(self, *, free: bool = False) -> str | None:
        """The whole wipe at once (shutdown, panic); return a problem, or None."""
        problem = self.begin_wipe(free=free)
        while not self.wipe_step(1 << 62):
            pass
        return problem

    def close(self) -> None:
        if self.fd < 0:
            return
        if self.backend == "posix":
            try:
                lease.release_lease(self.fd)
            except OSError:
                pass
        os.close(self.fd)
        self.fd = -1
        if self.readonly_fd >= 0:
            os.close(self.readonly_fd)
            self.readonly_fd = -1


def _zero(fd: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        chunk = min(len(_ZEROS), end - offset)
        try:
            written = os.pwrite(fd, memoryview(_ZEROS)[:chunk], offset)
        except OSError:
            written = 0
        if written <= 0:
            _punch(fd, offset, end - offset)
            return
        offset += written


def _punch(fd: int, offset: int, length: int) -> None:
    try:
        falloc.punch_hole(fd, offset, length)
    except OSError as exc:
        log.error("could not zero bytes %d-%d of a segment: %s", offset, offset + length, exc.strerror or exc)
