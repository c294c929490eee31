"""Property tests for the sans-IO protocol, beyond tests/test_protocol.py:
structured msgpack inputs that reach the schema checks, and a model-based
state machine of the broker end fed valid, invalid and split input.  The
long target reruns them with many more examples."""

from __future__ import annotations

import os
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shmbroker._wire import messages as m
from shmbroker._wire.connection import CLOSED, NEED_DATA, Connection, Side, State
from shmbroker._wire.frames import encode_frame
from shmbroker.errors import ProtocolError

MAX = 4096
LONG_EXAMPLES = int(os.environ.get("SHMBROKER_HYPOTHESIS_EXAMPLES", "5000"))

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=80) | st.binary(max_size=40)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
field_names = st.sampled_from(["version", "protocol", "channel", "role", "size", "fds", "slots", "serials", "code", "message", "status"]) | st.text(max_size=10)
bodies = st.builds(
    lambda kind, fields: {"type": kind, **fields},
    st.sampled_from([*m.REQUESTS, *m.REPLIES, "bogus"]) | st.text(max_size=10) | st.integers(),
    st.dictionaries(field_names, values | st.sampled_from(["producer", "consumer", "shmbroker", "frames", 1, 4096]), max_size=4),
)


def _check_decoded(msg: m.Message) -> None:
    """Anything decode() returns satisfies the invariants the broker relies on."""
    if isinstance(msg, m.Attach):
        assert m.valid_channel_name(msg.channel)
        assert msg.role in m.ROLES
        assert msg.size is None or (type(msg.size) is int and 0 < msg.size < 2**64)
    if isinstance(msg, m.Hello):
        assert type(msg.version) is int and msg.protocol == m.PROTOCOL_NAME
    assert m.decode(m.encode(msg), {msg.TYPE: type(msg)}) == msg


def _structured(body: dict[Any, Any]) -> None:
    try:
        raw = msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return
    for table in (m.REQUESTS, m.REPLIES):
        try:
            msg = m.decode(raw, table)
        except ProtocolError:
            continue
        _check_decoded(msg)


@given(bodies)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_structured_bodies_decode_only_to_valid_messages(body: dict[Any, Any]) -> None:
    _structured(body)


@pytest.mark.long
@given(bodies)
@settings(max_examples=LONG_EXAMPLES * 4, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_structured_bodies_decode_only_to_valid_messages_long(body: dict[Any, Any]) -> None:
    _structured(body)


requests = st.one_of(
    st.just(m.Hello()),
    st.builds(m.Attach, channel=st.from_regex(m.CHANNEL_NAME, fullmatch=True), role=st.sampled_from(m.ROLES),
              size=st.none() | st.integers(1, 2**32)),
    st.just(m.Detach()),
    st.just(m.StatusRequest()),
    st.just(m.Cursors()),
)


class BrokerEnd(RuleBasedStateMachine):
    """The broker end against a model of the conversation rules."""

    def __init__(self) -> None:
        super().__init__()
        self.conn = Connection(Side.BROKER, max_frame_size=MAX, max_pending_frames=4)
        self.hello = self.attached = self.done = False
        self.failed = False
        self.tainted = False  # garbage was accepted into the buffer: framing may be off

    def _expect_ok(self, msg: m.Message) -> bool:
        if not self.hello:
            return isinstance(msg, m.Hello) and msg.version == m.PROTOCOL_VERSION
        if isinstance(msg, m.Hello):
            return False
        if self.done:
            return False
        if isinstance(msg, m.Attach):
            return not self.attached
        if isinstance(msg, m.Detach | m.Cursors):
            return self.attached
        return True

    def _feed(self, data: bytes) -> list[m.Message]:
        out: list[m.Message] = []
        self.conn.receive_data(data)
        while (ev := self.conn.next_event()) is not NEED_DATA:
            assert ev is not CLOSED
            assert isinstance(ev, m.Message)
            # Whatever bytes got us here, only rule-abiding messages surface.
            assert self._expect_ok(ev), f"{ev} surfaced although the rules forbid it"
            out.append(ev)
            self._answer(ev)
        return out

    def _answer(self, ev: m.Message) -> None:
        if isinstance(ev, m.Hello):
            self.conn.send(m.Welcome(version=1, broker_pid=1))
            self.hello = True
        elif isinstance(ev, m.Attach):
            self.conn.send(m.Attached(channel=ev.channel, role=ev.role, size=1, generation=1, layout=1, fds=("segment",)))
            self.attached = True
        elif isinstance(ev, m.Detach):
            self.conn.send(m.Detached())
            self.done = True
        elif isinstance(ev, m.Cursors):
            self.conn.send(m.CursorPages(slots=(), serials=()))
        else:
            self.conn.send(m.StatusReply(status={}))

    @precondition(lambda self: not self.failed)
    @rule(msg=requests, cut=st.integers(0, 40))
    def send_request(self, msg: m.Message, cut: int) -> None:
        frame = encode_frame(m.encode(msg), MAX)
        ok = self._expect_ok(msg)
        try:
            got = self._feed(frame[:cut]) if 0 < cut < len(frame) else []
            got += self._feed(frame[cut:] if 0 < cut < len(frame) else frame)
        except ProtocolError:
            assert self.tainted or not ok, f"{msg} was refused but the rules allow it"
            self.failed = True
            return
        if not self.tainted:
            assert ok, f"{msg} was accepted but the rules forbid it"
            assert got == [msg]

    @precondition(lambda self: not self.failed)
    @rule(data=st.binary(min_size=1, max_size=64))
    def send_garbage(self, data: bytes) -> None:
        try:
            self._feed(data)
        except ProtocolError:
            self.failed = True
        else:
            self.tainted = True

    @precondition(lambda self: self.failed)
    @rule(msg=requests)
    def anything_after_failure_is_refused(self, msg: m.Message) -> None:
        try:
            self.conn.receive_data(encode_frame(m.encode(msg), MAX))
        except ProtocolError:
            pass
        with pytest.raises(ProtocolError):
            self.conn.next_event()

    @invariant()
    def failed_connections_stay_failed(self) -> None:
        if self.failed:
            assert self.conn.state is State.ERROR
            with pytest.raises(ProtocolError):
                self.conn.next_event()


TestBrokerEnd = BrokerEnd.TestCase
TestBrokerEnd.settings = settings(max_examples=150, stateful_step_count=20, deadline=None)


@pytest.mark.long
def test_broker_end_state_machine_long() -> None:
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(BrokerEnd, settings=settings(max_examples=LONG_EXAMPLES, stateful_step_count=30, deadline=None))
