"""The broker's teardown runs every step whatever fails (issue 12, point 3).

The old teardown iterated the sessions dict while closing them changed it,
and any exception on the way left the listening socket open and its path
in place: a crashed broker kept the socket directory locked for nobody.
In-process: the failure is injected where no outside peer can reach.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shmbroker import ShmClient
from shmbroker._broker import core, driver
from shmbroker._broker.config import ChannelSpec
from shmbroker._broker.config import default_config
from shmbroker._broker.segments import Segment


def test_teardown_closes_the_listener_and_wipes_the_rest_when_a_wipe_fails(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = str(short_tmp / "run" / "broker.sock")
    broker = driver.Broker(default_config(), sock)
    broker._setup()
    try:
        # Two live segments; wiping the first one raises.
        for name in ("first", "second"):
            broker.core.channels[name] = core.Channel(ChannelSpec(name=name, size=4096), configured=True)
            segment = Segment.create(4096, 1)
            segment.reserve()
            broker.core.channels[name].segment = segment
        first, second = broker.core.channels["first"].segment, broker.core.channels["second"].segment
        assert first is not None and second is not None
        real_wipe = Segment.wipe

        def failing_wipe(self: Segment, *, free: bool = False) -> str | None:
            if self is first:
                raise RuntimeError("injected")
            return real_wipe(self, free=free)

        monkeypatch.setattr(Segment, "wipe", failing_wipe)
    finally:
        broker._teardown()
    assert broker.listener.sock is None
    assert not os.path.exists(sock), "the socket path was left behind"
    assert second.fd < 0 and second.revoked, "a later segment was not wiped and closed"
    with pytest.raises(Exception):
        ShmClient.status(socket_path=sock, timeout=1)
