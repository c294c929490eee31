"""Coverage-guided fuzzing (atheris) of the broker end of the sans-IO protocol.

Run: python tests/fuzz/atheris_protocol.py -runs=200000 -max_len=512
(`make test-long` runs it through tests/test_fuzz_atheris.py when atheris is
installed: pip install atheris, or the `fuzz` extra).  Feeds arbitrary bytes
in arbitrary chunks, answers every request the way the broker could, and
requires that the only exception ever raised is ProtocolError, after which
the connection stays failed."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from shmbroker._wire import messages as m
    from shmbroker._wire.connection import CLOSED, NEED_DATA, Connection, Side, State
    from shmbroker.errors import ProtocolError


def _reply(event: m.Message, grant: bool) -> m.Message:
    if isinstance(event, m.Hello):
        return m.Welcome(version=m.PROTOCOL_VERSION, broker_pid=1)
    if isinstance(event, m.Attach):
        if not grant:
            return m.Error("limit", "no")
        return m.Attached(channel=event.channel, role=event.role, size=4096, generation=1, layout=1, fds=("segment",))
    if isinstance(event, m.Detach):
        return m.Detached()
    return m.StatusReply(status={})


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    conn = Connection(Side.BROKER, max_frame_size=1024, max_pending_frames=4)
    try:
        while fdp.remaining_bytes():
            chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64))
            if not chunk:
                break
            conn.receive_data(chunk)
            while (event := conn.next_event()) is not NEED_DATA and event is not CLOSED:
                assert isinstance(event, m.Message)
                conn.send(_reply(event, grant=fdp.ConsumeBool()))
        conn.receive_data(b"")
        while (event := conn.next_event()) is not NEED_DATA and event is not CLOSED:
            conn.send(_reply(event, grant=False))
    except ProtocolError:
        assert conn.state is State.ERROR
        try:
            conn.next_event()
        except ProtocolError:
            return
        raise AssertionError("a failed connection produced another event")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
