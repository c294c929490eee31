"""Client-side checks of the ring fds the broker sends with a segment, and
the producer's requests for its consumers' cursor pages."""

from __future__ import annotations

import logging
import os
import stat
import time
from typing import Any

from .. import errors
from .._sys import fdpass, memfd
from .._sys.mapping import Mapping
from .._wire import messages as m
from . import layout as L
from .layout import CONSUMER_FD_NAMES, producer_fd_names
from .ring import FetchedCursors

log = logging.getLogger(__name__)

# How long a producer waits for the broker's answer to a cursor request.
# The broker answers from memory at once; like the client's DETACH_TIMEOUT,
# this only bounds the stall when the broker is wedged.
CURSOR_FETCH_TIMEOUT = 1.0
# After a fetch that failed (timeout, refusal), ask again no sooner than
# this: a producer waiting for space rescans in a spin loop, and must not
# turn that into a request storm.  Meanwhile it bounds itself by the start
# indices, which is safe, only slower.  Same as CONSUMER_RECHECK_SECONDS.
CURSOR_FETCH_RETRY_SECONDS = 0.5


def expected_fd_names(reply: m.Attached) -> tuple[str, ...]:
    if not reply.ring:
        return ("segment",)
    return ("segment", *(producer_fd_names() if reply.role == "producer" else CONSUMER_FD_NAMES))


def check_page(fd: int, what: str, size: int) -> None:
    """A ring page (the control page, mapped writable by every peer, the
    index page or a cursor page) must be a memfd nobody can resize (a truncation would SIGBUS
    us on the next access) and nobody can reopen by path (mode 0)."""
    if not memfd.is_memfd(fd):
        raise errors.SegmentError(f"the broker sent a ring {what} that is not a memfd; refusing it")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 0 or stat.S_IMODE(st.st_mode) != 0:
        raise errors.SegmentError(
            f"the ring {what} is linked or has a non-zero mode, so others could open it; refusing it"
        )
    if not memfd.has_size_seals(fd):
        raise errors.SegmentError(
            f"the broker sent a ring {what} that is not sealed against resizing "
            "(F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL); a peer could truncate it and crash this "
            "process with SIGBUS, so it was refused"
        )
    if st.st_size != size:
        raise errors.SegmentError(f"the ring {what} is {st.st_size} bytes, expected {size}; refusing to map it")


class RingPages:
    """The mapped pages of a ring: ``control`` (read-write), ``index``
    (read-write for the producer, read-only for consumers) and, for a
    consumer, its own ``cursor`` page (read-write)."""

    def __init__(self, control: Mapping, index: Mapping, cursor: Mapping | None = None) -> None:
        self.control = control
        self.index = index
        self.cursor = cursor

    def close(self) -> None:
        for page in (self.control, self.index, self.cursor):
            if page is not None:
                page.close()


def take_ring_fds(reply: m.Attached, fds: list[int]) -> tuple[RingPages | None, list[int]]:
    """Remove the ring's fds from ``fds`` (leaving the segment); return the
    mapped pages (None for raw channels) and the ring's eventfds.

    Fails closed: any surprise (names, count, a page that is not a sealed
    memfd of one page, an fd that is not an eventfd, a consumer without a
    valid slot) closes every fd received and raises.
    O_NONBLOCK is not checked: it belongs to the open file description every
    holder shares, so a former peer can clear it at any time; every eventfd
    operation here works whatever the flag says (_sys/eventfd.py)."""
    mapped: list[Mapping] = []
    try:
        expected = expected_fd_names(reply)
        if reply.fds != expected or len(fds) != len(expected):
            raise errors.ProtocolError(
                f"the broker sent {len(fds)} file descriptor(s) for {list(reply.fds)}; expected {list(expected)}"
            )
        if not reply.ring:
            return None, []
        consumer = reply.role == "consumer"
        if consumer and (reply.slot is None or not 0 <= reply.slot < L.MAX_CONSUMERS):
            raise errors.ProtocolError(f"the broker assigned consumer slot {reply.slot}, which does not exist")
        if consumer and (reply.start is None or reply.start % L.ALIGN):
            # Without it the start would come from the cursor page, which
            # this consumer cannot yet tell apart from a forged one.
            raise errors.ProtocolError(f"the broker sent ring consumer start index {reply.start}; expected an aligned index")
        npages = 3 if consumer else 2
        check_page(fds[1], "control page", L.CONTROL_SIZE)
        check_page(fds[2], "index page", L.INDEX_SIZE)
        if consumer:
            check_page(fds[3], "cursor page", L.CURSOR_SIZE)
        for fd in fds[1 + npages :]:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventfd]":
                raise errors.ProtocolError("the broker sent a wake-up fd that is not an eventfd; refusing it")
        mapped.append(Mapping(fds[1], L.CONTROL_SIZE, writable=True))
        # Consumers only read the index page: their fd is O_RDONLY anyway,
        # and a read-only mapping keeps a bug of ours from writing it.
        mapped.append(Mapping(fds[2], L.INDEX_SIZE, writable=not consumer))
        if consumer:
            mapped.append(Mapping(fds[3], L.CURSOR_SIZE, writable=True))
        pages = RingPages(*mapped)
    except BaseException:
        for page in mapped:
            page.close()
        fdpass.close_all(fds)
        fds.clear()
        raise
    fdpass.close_all(fds[1 : 1 + npages])  # the mappings hold no fd
    ring_fds = fds[1 + npages :]
    del fds[1:]
    return pages, ring_fds


def take_cursor_pages(reply: m.CursorPages, fds: list[int]) -> FetchedCursors:
    """Check and map (read-only) the cursor pages of a CursorPages reply;
    close every fd.  Fails closed: any surprise unmaps what was mapped and
    raises, like :func:`take_ring_fds`."""
    pages: FetchedCursors = []
    try:
        if len(reply.slots) != len(reply.serials) or len(fds) != len(reply.slots):
            raise errors.ProtocolError(
                f"the broker sent {len(fds)} file descriptor(s) for {len(reply.slots)} cursor page(s) "
                f"and {len(reply.serials)} serial(s)"
            )
        for slot, serial in zip(reply.slots, reply.serials):
            if not 0 <= slot < L.MAX_CONSUMERS or serial == 0:
                raise errors.ProtocolError(f"the broker sent a cursor page for slot {slot}, serial {serial}")
        for fd in fds:
            check_page(fd, "cursor page", L.CURSOR_SIZE)
        for slot, serial, fd in zip(reply.slots, reply.serials, fds):
            pages.append((slot, serial, Mapping(fd, L.CURSOR_SIZE, writable=False)))
    except BaseException:
        for _, _, page in pages:
            page.close()
        raise
    finally:
        fdpass.close_all(fds)
    return pages


class CursorFetcher:
    """The producer's ``fetch_cursors`` callback: asks the broker for the
    current cursor pages on the attachment's own connection.

    A timeout or a refusal returns None, "no answer" (the producer keeps
    its safe bound), and no new attempt for CURSOR_FETCH_RETRY_SECONDS; the next
    attempt waits for the reply of the request that timed out rather than
    sending another.  A
    lost connection stops fetching.  Pages that fail the checks raise
    SegmentError now and on every later fetch (fail closed)."""

    def __init__(self, link: Any) -> None:
        self._link = link  # a _client._Link
        self._retry_at = 0.0
        self._refused: str | None = None
        self._dead = False

    def __call__(self) -> FetchedCursors | None:
        if self._refused is not None:
            raise errors.SegmentError(self._refused)
        if self._dead or time.monotonic() < self._retry_at:
            return None
        link = self._link
        replies: list[m.CursorPages] = []
        try:
            link.deadline = time.monotonic() + CURSOR_FETCH_TIMEOUT
            # A request that timed out is still pending: wait for its reply
            # instead of piling up requests behind a stalled broker.  If that
            # reply is already out of date, the producer finds the slot's
            # serial still unmatched and asks again at a later rescan.
            if not link.conn.awaiting:
                link.send(m.Cursors())
            # Every pending request gets its reply in order; all of their fds
            # then sit in the link, in the same order.
            while link.conn.awaiting:
                reply = link.receive()
                if not isinstance(reply, m.CursorPages):
                    raise errors.ProtocolError(f"the broker answered a cursor request with {reply.TYPE}")
                replies.append(reply)
        except (errors.Timeout, errors.PermissionDenied, errors.ChannelRevoked) as exc:
            log.info("could not fetch cursor pages of a ring (%s); retrying later", exc)
            self._retry_at = time.monotonic() + CURSOR_FETCH_RETRY_SECONDS
            return None  # fds already received stay with the link for the late replies
        except errors.ShmBrokerError as exc:
            log.info("stopped fetching cursor pages of a ring: %s", exc)
            self._dead = True
            fdpass.close_all(link.take_fds())
            return None
        fds = link.take_fds()
        out: FetchedCursors = []
        try:
            for reply in replies:
                count = len(reply.slots)
                mine, fds = fds[:count], fds[count:]
                out.extend(take_cursor_pages(reply, mine))
            if fds:
                raise errors.ProtocolError(f"the broker sent {len(fds)} file descriptor(s) more than cursor pages")
        except errors.ShmBrokerError as exc:
            fdpass.close_all(fds)
            for _, _, page in out:
                page.close()
            self._refused = f"refused the cursor pages the broker sent: {exc}; attach again"
            raise errors.SegmentError(self._refused) from None
        return out
