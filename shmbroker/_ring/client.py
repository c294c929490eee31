"""Client-side checks of the ring fds the broker sends with a segment."""

from __future__ import annotations

import os
import stat

from .. import errors
from .._sys import fdpass, memfd
from .._sys.mapping import Mapping
from .._wire import messages as m
from . import layout as L
from .broker import CONSUMER_FD_NAMES, producer_fd_names


def expected_fd_names(reply: m.Attached) -> tuple[str, ...]:
    if not reply.ring:
        return ("segment",)
    return ("segment", *(producer_fd_names() if reply.role == "producer" else CONSUMER_FD_NAMES))


def check_page(fd: int, what: str = "control page") -> None:
    """A ring page (the control page, mapped writable by every peer, or the
    index page) must be a memfd nobody can resize (a truncation would SIGBUS
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
    if st.st_size != L.CONTROL_SIZE:
        raise errors.SegmentError(
            f"the ring {what} is {st.st_size} bytes, expected {L.CONTROL_SIZE}; refusing to map it"
        )


class RingPages:
    """The two mapped pages of a ring: ``control`` (read-write) and ``index``
    (read-write for the producer, read-only for consumers)."""

    def __init__(self, control: Mapping, index: Mapping) -> None:
        self.control = control
        self.index = index

    def close(self) -> None:
        self.control.close()
        self.index.close()


def take_ring_fds(reply: m.Attached, fds: list[int]) -> tuple[RingPages | None, list[int]]:
    """Remove the ring's fds from ``fds`` (leaving the segment); return the
    mapped pages (None for raw channels) and the ring's eventfds.

    Fails closed: any surprise (names, count, a page that is not a sealed
    memfd of one page, an fd that is not an eventfd, a consumer without a
    valid slot) closes every fd received and raises.
    O_NONBLOCK is not checked: it belongs to the open file description every
    holder shares, so a former peer can clear it at any time; every eventfd
    operation here works whatever the flag says (_sys/eventfd.py)."""
    control: Mapping | None = None
    try:
        expected = expected_fd_names(reply)
        if reply.fds != expected or len(fds) != len(expected):
            raise errors.ProtocolError(
                f"the broker sent {len(fds)} file descriptor(s) for {list(reply.fds)}; expected {list(expected)}"
            )
        if not reply.ring:
            return None, []
        if reply.role == "consumer" and (reply.slot is None or not 0 <= reply.slot < L.MAX_CONSUMERS):
            raise errors.ProtocolError(f"the broker assigned consumer slot {reply.slot}, which does not exist")
        if reply.role == "consumer" and (reply.start is None or reply.start % L.ALIGN):
            # Without it the start would come from the control page, which
            # every consumer of the ring can write.
            raise errors.ProtocolError(f"the broker sent ring consumer start index {reply.start}; expected an aligned index")
        check_page(fds[1], "control page")
        check_page(fds[2], "index page")
        for fd in fds[3:]:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventfd]":
                raise errors.ProtocolError("the broker sent a wake-up fd that is not an eventfd; refusing it")
        control = Mapping(fds[1], L.CONTROL_SIZE, writable=True)
        # Consumers only read the index page: their fd is O_RDONLY anyway,
        # and a read-only mapping keeps a bug of ours from writing it.
        pages = RingPages(control, Mapping(fds[2], L.INDEX_SIZE, writable=reply.role == "producer"))
    except BaseException:
        if control is not None:
            control.close()
        fdpass.close_all(fds)
        fds.clear()
        raise
    fdpass.close_all(fds[1:3])  # the mappings hold no fd
    ring_fds = fds[3:]
    del fds[1:]
    return pages, ring_fds
