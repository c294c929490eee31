"""Per-connection protocol state, for either end, in the style of h11.

The broker end enforces the conversation: ``hello`` first, at most one
``attach`` per connection, ``detach`` only when attached, and one request in
flight at a time (the next request is not surfaced until the previous one
got its reply: :data:`PAUSED`, so a client pipelining requests cannot make
the broker queue work).  The client end checks that each reply answers the
request it sent.  Which request may come in which state, and where its
reply leads, is data (:data:`_TRANSITIONS`); any failure, on either side,
leaves the connection in ``ERROR`` for good, as in h11.
"""

from __future__ import annotations

import enum
from collections import deque

from ..errors import ProtocolError
from . import messages as m
from .frames import FrameDecoder, encode_frame


class Side(enum.Enum):
    CLIENT = "client"
    BROKER = "broker"


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"
    READY = "ready"  # hello done, nothing attached
    ATTACHED = "attached"
    DONE = "done"  # detached: only closing remains
    ERROR = "error"


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


# What next_event() returns when it has no message: more bytes are needed;
# the peer closed cleanly; or (broker end) a request is buffered but waits
# until the current one is answered.
NEED_DATA = _Sentinel("NEED_DATA")
CLOSED = _Sentinel("CLOSED")
PAUSED = _Sentinel("PAUSED")

_REPLIES_TO: dict[type[m.Message], tuple[type[m.Message], ...]] = {
    m.Hello: (m.Welcome, m.Error),
    m.Attach: (m.Attached, m.Error),
    m.Detach: (m.Detached, m.Error),
    m.StatusRequest: (m.StatusReply, m.Error),
    m.Cursors: (m.CursorPages, m.Error),
}

# (state, request) -> the state a successful reply leads to.  A request not
# listed for a state is a protocol error, worded by _WRONG_STATE; an error
# reply leaves the state as it was, except to hello (ERROR).
_TRANSITIONS: dict[tuple[State, type[m.Message]], State] = {
    (State.AWAIT_HELLO, m.Hello): State.READY,
    (State.READY, m.Attach): State.ATTACHED,
    (State.READY, m.StatusRequest): State.READY,
    (State.ATTACHED, m.Detach): State.DONE,
    (State.ATTACHED, m.StatusRequest): State.ATTACHED,
    (State.ATTACHED, m.Cursors): State.ATTACHED,
}
_WRONG_STATE: dict[type[m.Message], str] = {
    m.Hello: "hello sent twice",
    m.Attach: "only one attach per connection; open a new connection",
    m.Detach: "detach without an attachment",
    m.Cursors: "cursors without an attachment (only a ring's producer may ask)",
}


class Connection:
    def __init__(self, side: Side, *, max_frame_size: int, max_pending_frames: int = 16) -> None:
        self.side = side
        self.state = State.AWAIT_HELLO
        self._max_frame_size = max_frame_size
        self._decoder = FrameDecoder(max_frame_size, max_buffered=max_pending_frames * (max_frame_size + 4))
        self._eof = False
        # Requests awaiting a reply: the broker end sees at most one, the
        # client end may pipeline (hello + attach in one write).
        self._pending: deque[type[m.Message]] = deque()
        self._incoming = m.REQUESTS if side is Side.BROKER else m.REPLIES

    # -- receiving ---------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the socket; ``b""`` means the peer closed."""
        if not data:
            self._eof = True
            return
        try:
            self._decoder.feed(data)
        except ProtocolError:
            self.state = State.ERROR
            raise

    @property
    def request_waiting(self) -> bool:
        """A whole request is buffered and would be surfaced by :meth:`next_event` now."""
        return not (self.side is Side.BROKER and self._pending) and self._decoder.has_frame()

    def next_event(self) -> m.Message | _Sentinel:
        if self.state is State.ERROR:
            raise ProtocolError("connection already failed")
        if self.side is Side.BROKER and self._pending:
            return PAUSED  # until the current request is answered
        try:
            body = self._decoder.next_frame()
            if body is None:
                if self._eof:
                    if self._decoder.buffered:
                        raise ProtocolError("peer closed the connection in the middle of a frame")
                    return CLOSED
                return NEED_DATA
            message = m.decode(body, self._incoming)
            self._accept(message)
        except ProtocolError:
            self.state = State.ERROR
            raise
        return message

    def _accept(self, message: m.Message) -> None:
        if self.side is Side.CLIENT:
            self._accept_reply(message)
        else:
            self._accept_request(message)

    def _accept_request(self, message: m.Message) -> None:
        kind = type(message)
        if (self.state, kind) not in _TRANSITIONS:
            if self.state is State.AWAIT_HELLO:
                raise ProtocolError(f"expected hello first, got {message.TYPE}")
            if self.state is State.DONE:
                raise ProtocolError(f"{message.TYPE} after detach")
            raise ProtocolError(_WRONG_STATE.get(kind, f"{message.TYPE} is not allowed now"))
        if isinstance(message, m.Hello) and message.version != m.PROTOCOL_VERSION:
            raise ProtocolError(
                f"unsupported protocol version {message.version}; this broker speaks "
                f"version {m.PROTOCOL_VERSION}: upgrade shmbroker on one side"
            )
        self._pending.append(kind)

    def _accept_reply(self, message: m.Message) -> None:
        if not self._pending:
            if isinstance(message, m.Error):
                return  # the broker may refuse at any time (deadline, shutdown)
            raise ProtocolError(f"unsolicited {message.TYPE} from broker")
        request = self._pending.popleft()
        if type(message) not in _REPLIES_TO[request]:
            raise ProtocolError(f"broker answered {request.TYPE} with {message.TYPE}")
        self._advance(request, message)

    @property
    def awaiting(self) -> int:
        """Requests sent (client end) or received (broker end) still without a reply."""
        return len(self._pending)

    # -- sending -----------------------------------------------------------
    def send(self, message: m.Message) -> bytes:
        """Encode a message for the wire, checking that it fits the conversation.

        A message that does not fit raises ValueError and leaves the
        connection in ERROR: only error replies may follow."""
        try:
            if self.state is State.ERROR and not isinstance(message, m.Error):
                raise ValueError(f"cannot send {message.TYPE}: the connection already failed")
            if self.side is Side.CLIENT:
                if type(message) not in m.REQUESTS.values():
                    raise ValueError(f"a client cannot send {message.TYPE}")
                self._pending.append(type(message))
            else:
                if type(message) not in m.REPLIES.values():
                    raise ValueError(f"a broker cannot send {message.TYPE}")
                if self._pending:
                    request = self._pending.popleft()
                    if type(message) not in _REPLIES_TO[request]:
                        raise ValueError(f"{message.TYPE} does not answer {request.TYPE}")
                    self._advance(request, message)
                elif not isinstance(message, m.Error):
                    raise ValueError(f"{message.TYPE} answers no request")
            return encode_frame(m.encode(message), self._max_frame_size_for(message))
        except ValueError:
            self.state = State.ERROR
            raise

    def _max_frame_size_for(self, message: m.Message) -> int:
        # Status replies grow with the number of peers; the client accepts
        # them up to its own (larger) limit, so do not cap them here.
        return 2**32 - 1 if isinstance(message, m.StatusReply) else self._max_frame_size

    def _advance(self, request: type[m.Message], reply: m.Message) -> None:
        if isinstance(reply, m.Error):
            if request is m.Hello:
                self.state = State.ERROR
            return
        self.state = _TRANSITIONS.get((self.state, request), self.state)
