"""The driver's one send path, in-process on a real socketpair.

An error used to be written straight to the socket while the previous reply
was still partly queued, so the peer could receive the error's bytes in the
middle of the other frame (issue 13).  Now everything goes through the
outbox, in order: the peer sees a prefix of whole frames, never a splice.
"""

from __future__ import annotations

import socket
from pathlib import Path

from shmbroker._broker import core as c
from shmbroker._broker import driver
from shmbroker._broker.auth import VerifiedPeer
from shmbroker._broker.config import default_config
from shmbroker._broker.policy import Identity
from shmbroker._wire import messages as m
from shmbroker._wire.connection import Connection, Side
from shmbroker._wire.frames import encode_frame


def test_an_error_never_lands_inside_a_partly_sent_reply(short_tmp: Path) -> None:
    broker = driver.Broker(default_config(), str(short_tmp / "run" / "b.sock"))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    charge = broker.core.ledger.charge(0, connections=1)
    member = c.Member(VerifiedPeer(Identity(1, 0, 0, (), (0, 0), "/x"), -1, "test"), charge, 0.0)
    session = driver.Session(ours, member, Connection(Side.BROKER, max_frame_size=1 << 20))
    big = encode_frame(b"s" * 200_000, 1 << 20)
    session.outbox.put_owned(big, [])
    assert not session.outbox.flush(ours), "the socket took the whole frame; the scenario needs it full"
    theirs.recv(8192)  # the peer reads a little: room for a small frame, not for the rest
    error = m.Error("protocol", "protocol error: enough")
    broker._fail(session, error)
    received = bytearray()
    theirs.settimeout(2)
    while chunk := theirs.recv(1 << 20):
        received += chunk
    theirs.close()
    expected = big + Connection(Side.BROKER, max_frame_size=1 << 20).send(error)
    # Everything the peer got is a prefix of the frames in order (the
    # error is dropped if the socket had no room left; it is never spliced).
    assert expected[8192:].startswith(bytes(received)), "frames were spliced"
