"""The sans-IO wire protocol, tested without sockets."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmbroker._wire import messages as m
from shmbroker._wire.connection import CLOSED, NEED_DATA, PAUSED, Connection, Side, State
from shmbroker._wire.frames import FrameDecoder, encode_frame
from shmbroker.errors import ProtocolError

MAX = 64 * 1024

channel_names = st.from_regex(m.CHANNEL_NAME, fullmatch=True)
requests = st.one_of(
    st.just(m.Hello()),
    st.builds(m.Attach, channel=channel_names, role=st.sampled_from(m.ROLES), size=st.none() | st.integers(1, 2**64 - 1)),
    st.just(m.Detach()),
    st.just(m.StatusRequest()),
    st.just(m.Cursors()),
)
replies = st.one_of(
    st.builds(m.Welcome, version=st.integers(0, 2**64 - 1), broker_pid=st.integers(0, 2**31)),
    st.builds(
        m.Attached,
        channel=channel_names,
        role=st.sampled_from(m.ROLES),
        size=st.integers(0, 2**64 - 1),
        generation=st.integers(0, 2**64 - 1),
        layout=st.integers(0, 10),
        fds=st.lists(st.text(max_size=20), max_size=16).map(tuple),
    ),
    st.just(m.Detached()),
    st.integers(0, 16).flatmap(
        lambda n: st.builds(
            m.CursorPages,
            slots=st.lists(st.integers(0, 63), min_size=n, max_size=n).map(tuple),
            serials=st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n).map(tuple),
        )
    ),
    st.builds(m.Error, code=st.sampled_from(m.ERROR_CODES), message=st.text(max_size=200)),
)


def frame(obj: object) -> bytes:
    body = msgpack.packb(obj)
    return struct.pack(">I", len(body)) + body


def broker_conn() -> Connection:
    return Connection(Side.BROKER, max_frame_size=MAX)


def events(conn: Connection) -> list[object]:
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA or ev is CLOSED:
            out.append(ev)
            return out
        out.append(ev)


@given(requests)
def test_requests_round_trip(msg: m.Message) -> None:
    assert m.decode(m.encode(msg), m.REQUESTS) == msg


@given(replies)
def test_replies_round_trip(msg: m.Message) -> None:
    assert m.decode(m.encode(msg), m.REPLIES) == msg


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_arbitrary_bytes_only_ever_raise_protocol_error(data: bytes) -> None:
    conn = broker_conn()
    try:
        conn.receive_data(data)
        conn.receive_data(b"")
        events(conn)
    except ProtocolError:
        assert conn.state is State.ERROR


@given(st.binary(min_size=1, max_size=200))
@settings(max_examples=300)
def test_arbitrary_bodies_never_decode_to_something_unvalidated(body: bytes) -> None:
    try:
        msg = m.decode(body, m.REQUESTS)
    except ProtocolError:
        return
    # Anything that decodes must re-encode to an equivalent message.
    assert m.decode(m.encode(msg), m.REQUESTS) == msg


@given(st.lists(st.integers(0, 60), max_size=10))
def test_splitting_the_stream_anywhere_gives_the_same_events(cuts: list[int]) -> None:
    stream = encode_frame(m.encode(m.Hello()), MAX) + encode_frame(m.encode(m.Attach("frames", "producer", 4096)), MAX)
    conn = broker_conn()
    got: list[object] = []
    pos = 0
    for cut in sorted(set(c for c in cuts if c < len(stream))) + [len(stream)]:
        if cut == pos:
            continue  # receive_data(b"") means EOF, not "no bytes yet"
        conn.receive_data(stream[pos:cut])
        pos = cut
        while (ev := conn.next_event()) is not NEED_DATA:
            got.append(ev)
            conn.send(m.Welcome(1, 1) if isinstance(ev, m.Hello) else m.Error("limit", "x"))
    assert got == [m.Hello(), m.Attach("frames", "producer", 4096)]


def test_oversized_frame_is_refused_before_buffering() -> None:
    decoder = FrameDecoder(max_frame_size=1024, max_buffered=4096)
    decoder.feed(struct.pack(">I", 2**32 - 1))
    with pytest.raises(ProtocolError, match="outside 1..1024"):
        decoder.next_frame()


def test_zero_length_frame_is_refused() -> None:
    conn = broker_conn()
    conn.receive_data(b"\0\0\0\0")
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_flooding_without_reading_replies_is_refused() -> None:
    conn = Connection(Side.BROKER, max_frame_size=MAX, max_pending_frames=2)
    hello = encode_frame(m.encode(m.Hello()), MAX)
    with pytest.raises(ProtocolError, match="without waiting"):
        for _ in range(100000):
            conn.receive_data(hello)


@pytest.mark.parametrize(
    "body, reason",
    [
        ({"type": "hello", "version": 1}, "missing field 'protocol'"),
        ({"type": "hello", "version": True, "protocol": "shmbroker"}, "invalid value for 'version'"),
        ({"type": "hello", "version": 1, "protocol": "shmbroker", "admin": True}, "unknown field"),
        ({"type": "nope"}, "unexpected message type"),
        ([1, 2, 3], "not a msgpack map"),
        ({"type": "welcome", "version": 1, "broker_pid": 1}, "unexpected message type"),
    ],
)
def test_malformed_messages_are_refused(body: object, reason: str) -> None:
    conn = broker_conn()
    conn.receive_data(frame(body))
    with pytest.raises(ProtocolError, match=reason):
        conn.next_event()
    assert conn.state is State.ERROR


@pytest.mark.parametrize(
    "attach",
    [
        {"type": "attach", "channel": "../etc", "role": "producer"},
        {"type": "attach", "channel": "", "role": "producer"},
        {"type": "attach", "channel": "x" * 65, "role": "producer"},
        {"type": "attach", "channel": "ok", "role": "admin"},
        {"type": "attach", "channel": "ok", "role": "producer", "size": 0},
        {"type": "attach", "channel": "ok", "role": "producer", "size": -1},
        {"type": "attach", "channel": "ok", "role": "producer", "size": 1.5},
    ],
)
def test_invalid_attach_fields_are_refused(attach: dict[str, object]) -> None:
    conn = broker_conn()
    conn.receive_data(frame({"type": "hello", "version": 1, "protocol": "shmbroker"}) + frame(attach))
    assert isinstance(conn.next_event(), m.Hello)
    conn.send(m.Welcome(1, 1))
    with pytest.raises(ProtocolError, match="invalid value"):
        conn.next_event()


def test_hello_must_come_first() -> None:
    conn = broker_conn()
    conn.receive_data(encode_frame(m.encode(m.StatusRequest()), MAX))
    with pytest.raises(ProtocolError, match="expected hello first"):
        conn.next_event()


def test_wrong_version_is_refused_with_advice() -> None:
    conn = broker_conn()
    conn.receive_data(encode_frame(m.encode(m.Hello(version=2)), MAX))
    with pytest.raises(ProtocolError, match="unsupported protocol version 2.*upgrade"):
        conn.next_event()


def test_one_attach_per_connection_and_requests_wait_for_replies() -> None:
    conn = broker_conn()
    attach = encode_frame(m.encode(m.Attach("a", "producer", 10)), MAX)
    conn.receive_data(encode_frame(m.encode(m.Hello()), MAX) + attach + attach)
    assert isinstance(conn.next_event(), m.Hello)
    # Paused until the hello is answered: no request is surfaced early, and
    # the pause is not mistaken for a need of more bytes.
    assert conn.next_event() is PAUSED
    conn.send(m.Welcome(1, 1))
    assert isinstance(conn.next_event(), m.Attach)
    conn.send(m.Attached("a", "producer", 10, 1, 1, ("segment",)))
    assert conn.state is State.ATTACHED
    with pytest.raises(ProtocolError, match="only one attach"):
        conn.next_event()


def test_eof_mid_frame_is_an_error_and_clean_eof_is_closed() -> None:
    conn = broker_conn()
    conn.receive_data(encode_frame(m.encode(m.Hello()), MAX)[:-1])
    conn.receive_data(b"")
    with pytest.raises(ProtocolError, match="middle of a frame"):
        conn.next_event()
    clean = broker_conn()
    clean.receive_data(b"")
    assert clean.next_event() is CLOSED


def test_client_refuses_a_reply_that_answers_another_request() -> None:
    conn = Connection(Side.CLIENT, max_frame_size=MAX)
    conn.send(m.Hello())
    conn.receive_data(encode_frame(m.encode(m.Detached()), MAX))
    with pytest.raises(ProtocolError, match="answered hello with detached"):
        conn.next_event()


def test_broker_cannot_send_a_reply_to_nothing() -> None:
    with pytest.raises(ValueError):
        broker_conn().send(m.Welcome(1, 1))


def test_a_reply_that_does_not_fit_leaves_the_connection_failed() -> None:
    conn = broker_conn()
    conn.receive_data(encode_frame(m.encode(m.Hello()), MAX))
    assert isinstance(conn.next_event(), m.Hello)
    with pytest.raises(ValueError, match="does not answer hello"):
        conn.send(m.Detached())
    assert conn.state is State.ERROR
    with pytest.raises(ValueError, match="already failed"):
        conn.send(m.Welcome(1, 1))
    conn.send(m.Error("protocol", "only an error may follow"))
