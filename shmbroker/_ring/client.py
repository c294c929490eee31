"""Client-side checks of the ring fds the broker sends with a segment."""

from __future__ import annotations

import os

from .. import errors
from .._sys import fdpass
from .._wire import messages as m
from . import layout as L
from .broker import CONSUMER_FD_NAMES, producer_fd_names


def expected_fd_names(reply: m.Attached) -> tuple[str, ...]:
    if not reply.ring:
        return ("segment",)
    return ("segment", *(producer_fd_names() if reply.role == "producer" else CONSUMER_FD_NAMES))


def take_ring_fds(reply: m.Attached, fds: list[int]) -> list[int]:
    """Remove and return the ring's eventfds from ``fds`` (leaving the segment).

    Fails closed: any surprise (names, count, an fd that is not an eventfd,
    a consumer without a valid slot) closes every fd received and raises.
    O_NONBLOCK is not checked: it belongs to the open file description every
    holder shares, so a former peer can clear it at any time; every eventfd
    operation here works whatever the flag says (_sys/eventfd.py)."""
    try:
        expected = expected_fd_names(reply)
        if reply.fds != expected or len(fds) != len(expected):
            raise errors.ProtocolError(
                f"the broker sent {len(fds)} file descriptor(s) for {list(reply.fds)}; expected {list(expected)}"
            )
        if reply.ring and reply.role == "consumer" and (reply.slot is None or not 0 <= reply.slot < L.MAX_CONSUMERS):
            raise errors.ProtocolError(f"the broker assigned consumer slot {reply.slot}, which does not exist")
        for fd in fds[1:]:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventfd]":
                raise errors.ProtocolError("the broker sent a wake-up fd that is not an eventfd; refusing it")
    except BaseException:
        fdpass.close_all(fds)
        fds.clear()
        raise
    ring_fds = fds[1:]
    del fds[1:]
    return ring_fds
