"""Replies waiting to be written to one peer: the broker's only send path.

Frames leave in the order they were queued, so no frame is ever written into
the middle of another.  Each queued frame owns the fds it carries (the
broker queues duplicates, see loop.py): the reply may wait (the peer is not
reading) while the segment it names is revoked and its fd closed, and the
number reused for another channel's segment; a bare number would then hand
out the wrong segment.
"""

from __future__ import annotations

import collections
import os
import socket

from .._sys import fdpass


def duplicate(fds: list[int]) -> list[int]:
    """Close-on-exec copies of ``fds`` for a queued frame to own; OSError (EMFILE) leaves none behind."""
    copies: list[int] = []
    try:
        for fd in fds:
            copies.append(os.dup(fd))  # non-inheritable, i.e. close-on-exec
    except BaseException:
        fdpass.close_all(copies)
        raise
    return copies


class Outbox:
    def __init__(self) -> None:
        self._queue: collections.deque[tuple[memoryview, list[int]]] = collections.deque()
        self._partial = False

    def __bool__(self) -> bool:
        return bool(self._queue)

    @property
    def partly_sent(self) -> bool:
        """Part of the first frame is on the wire: nothing may be written before the rest."""
        return self._partial

    def put_owned(self, frame: bytes, fds: list[int]) -> None:
        """Queue ``frame``; the outbox now owns ``fds`` (sent with it, or closed by :meth:`clear`)."""
        self._queue.append((memoryview(frame), fds))

    def queued_fds(self) -> list[int]:
        return [fd for _, fds in self._queue for fd in fds]

    def flush(self, sock: socket.socket) -> bool:
        """Write what the socket takes; True once everything is written.

        Raises OSError (EPIPE, ECONNRESET) when the peer is gone."""
        queue = self._queue
        if len(queue) > 1 and sum(1 for _, fds in queue if fds) <= 1:
            # One write for everything queued (a pipelined hello+attach gets
            # welcome+attached in one sendmsg, so the client wakes once).  The
            # fds ride with the first byte of the joined buffer, no later than
            # the frame they belong to; the client collects fds as they arrive
            # and claims them when that frame is parsed.
            fds = [fd for _, frame_fds in queue for fd in frame_fds]
            joined = memoryview(b"".join(bytes(data) for data, _ in queue))
            queue.clear()
            queue.append((joined, fds))
        while queue:
            data, fds = queue[0]
            try:
                sent = fdpass.send_with_fds(sock, data, fds)
            except (BlockingIOError, InterruptedError):
                return False
            # SCM_RIGHTS travel with the first byte; never send them twice.
            fdpass.close_all(fds)
            if sent < len(data):
                queue[0] = (data[sent:], [])
                self._partial = True
            else:
                queue.popleft()
                self._partial = False
        return True

    def clear(self) -> None:
        for _, fds in self._queue:
            fdpass.close_all(fds)
        self._queue.clear()
        self._partial = False
