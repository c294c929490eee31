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


def check_control(fd: int) -> None:
    """The control page is mapped writable by every peer of the ring, so it
    must be a memfd nobody can resize (a truncation would SIGBUS us on the
    next cursor store) and nobody can reopen by path (mode 0)."""
    if not memfd.is_memfd(fd):
        raise errors.SegmentError("the broker sent a ring control page that is not a memfd; refusing it")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 0 or stat.S_IMODE(st.st_mode) != 0:
        raise errors.SegmentError(
            "the ring control page is linked or has a non-zero mode, so others could open it; refusing it"
        )
    if not memfd.has_size_seals(fd):
        raise errors.SegmentError(
            "the broker sent a ring control page that is not sealed against resizing "
            "(F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL); a peer could truncate it and crash this "
            "process with SIGBUS, so it was refused"
        )
    if st.st_size != L.CONTROL_SIZE:
        raise errors.SegmentError(
            f"the ring control page is {st.st_size} bytes, expected {L.CONTROL_SIZE}; refusing to map it"
        )


def take_ring_fds(reply: m.Attached, fds: list[int]) -> tuple[Mapping | None, list[int]]:
    """Remove the ring's fds from ``fds`` (leaving the segment); return the
    mapped control page (None for raw channels) and the ring's eventfds.

    Fails closed: any surprise (names, count, a control page that is not a
    sealed memfd of CONTROL_SIZE bytes, an fd that is not an eventfd, a
    consumer without a valid slot) closes every fd received and raises.
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
        check_control(fds[1])
        for fd in fds[2:]:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventfd]":
                raise errors.ProtocolError("the broker sent a wake-up fd that is not an eventfd; refusing it")
        control = Mapping(fds[1], L.CONTROL_SIZE, writable=True)
    except BaseException:
        fdpass.close_all(fds)
        fds.clear()
        raise
    os.close(fds[1])  # the mapping holds no fd
    ring_fds = fds[2:]
    del fds[1:]
    return control, ring_fds
