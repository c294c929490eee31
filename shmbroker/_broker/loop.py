"""The broker's event loop: wires the listener, peer verification, policy,
segments and the sans-IO protocol together.  It holds no policy of its own.

Single-threaded on purpose: every state change happens here, signals arrive
through ``signal.set_wakeup_fd`` and are handled between events (never inside
a signal handler), and deadlines are checked by the loop, not by alarms.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import resource
import selectors
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from .. import __version__
from .._layout import FLAG_RING, LAYOUT_VERSION
from .._ring.broker import RingState
from .._ring.layout import resolve_max_message
from .._sys import fdpass
from .._sys.peercred import peer_credentials
from .._sys.sdnotify import Notifier
from .._wire import messages as m
from .._wire.connection import CLOSED, NEED_DATA, Connection, Side, State
from ..errors import (
    ChannelBusy,
    ChannelNotFound,
    LimitExceeded,
    PermissionDenied,
    ProtocolError,
    ShmBrokerError,
)
from . import auth
from .auth import AuthError, VerifiedPeer, recheck, verify_peer
from .config import BrokerConfig, ChannelSpec, check_broker_user
from .events import EventLog
from .listener import Listener
from .segments import Segment

log = logging.getLogger(__name__)

# How often the loop wakes up with nothing to do, to enforce deadlines and
# to re-check leases in case a SIGIO was coalesced with another signal.
TICK_SECONDS = 1.0
# Largest read per recvmsg; frames are far smaller (limits.max_frame_size).
RECV_SIZE = 64 * 1024
# Accepts per loop iteration, so a connection storm cannot starve the
# sessions that are already established.
ACCEPT_BURST = 32
# fds per connection (socket + pidfd, and a ring consumer's cursor page)
# and spare ones for segments, the listener, /proc reads and fds a hostile
# client sends before we close them (up to SCM_MAX_FD at once).
FDS_PER_CONNECTION = 3
FD_HEADROOM = 512

_ERROR_CODES: dict[type[ShmBrokerError], str] = {
    PermissionDenied: "permission_denied",
    ChannelNotFound: "not_found",
    ChannelBusy: "conflict",
    LimitExceeded: "limit",
    ProtocolError: "protocol",
}


class Channel:
    """A named channel; it holds a segment only while someone is attached."""

    def __init__(self, spec: ChannelSpec, *, configured: bool, owner_uid: int | None) -> None:
        self.spec = spec
        self.configured = configured
        self.owner_uid = owner_uid  # charged for the segment when created on demand
        self.segment: Segment | None = None
        self.ring: RingState | None = None  # with the segment, for ring channels
        self.generation = 0
        self.sessions: set[Session] = set()

    @property
    def name(self) -> str:
        return self.spec.name


class Session:
    """One accepted connection from a verified peer."""

    def __init__(self, sock: socket.socket, peer: VerifiedPeer, conn: Connection, deadline: float) -> None:
        self.sock = sock
        self.peer = peer
        self.conn = conn
        self.deadline: float | None = deadline  # None once attached
        self.channel: Channel | None = None
        self.segment: Segment | None = None
        self.ring: RingState | None = None
        self.role: str | None = None
        self.attached_at: float | None = None
        self.outq: collections.deque[tuple[memoryview, list[int]]] = collections.deque()
        self.close_after_flush = False
        self.want_write = False  # registered for EVENT_WRITE: the socket buffer was full

    @property
    def uid(self) -> int:
        return self.peer.identity.uid


class Broker:
    def __init__(
        self,
        config: BrokerConfig,
        socket_path: str,
        *,
        listen_socket: socket.socket | None = None,
        on_ready: Callable[[Broker], None] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        check_broker_user(config)
        self.config = config
        self.policy = config.policy
        self.limits = config.limits
        self.listener = Listener(socket_path, config.socket_group)
        self._adopted = listen_socket
        self._on_ready = on_ready
        self.notifier = notifier or Notifier(None, None)
        self.events = EventLog()
        self.channels: dict[str, Channel] = {
            name: Channel(spec, configured=True, owner_uid=None) for name, spec in config.channels.items()
        }
        self.sessions: dict[int, Session] = {}
        self.selector = selectors.DefaultSelector()
        self.started = time.time()
        self._running = False
        self._wakeup_r = -1
        self._wakeup_w = -1
        self._old_wakeup = -1
        self._old_handlers: dict[int, Any] = {}
        self._bytes_by_uid: collections.Counter[int] = collections.Counter()
        self._segments_by_uid: collections.Counter[int] = collections.Counter()
        self._next_sweep = 0.0  # monotonic time of the next lease/truncation check

    # -- lifecycle ---------------------------------------------------------
    def run(self) -> None:
        """Serve until SIGTERM/SIGINT; always wipes segments and removes the socket."""
        try:
            self._setup()
            self._running = True
            if self._on_ready is not None:
                self._on_ready(self)
            # After on_ready: under `serve`, READY=1 means sandboxed as well.
            self.notifier.ready(f"listening on {self.listener.path}")
            while self._running:
                self._iterate()
        finally:
            self._teardown()
            self.notifier.close()

    def stop(self) -> None:
        self._running = False

    def _setup(self) -> None:
        # Install the handlers before any segment (and so any lease) exists:
        # a lease break sends SIGIO, whose default action kills the process.
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old_wakeup = signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        for signum in (signal.SIGIO, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
            self._old_handlers[signum] = signal.signal(signum, _note_signal)
        if auth.after_credentials_hook is not None:
            # Only Python code in this very process can set the seam (no
            # config key, option or environment variable reaches it); say so
            # loudly should it ever be set outside the test suite.
            log.warning("test seam auth.after_credentials_hook is set: this broker runs under a test harness")
        _ensure_fd_headroom(FDS_PER_CONNECTION * self.limits.max_connections + FD_HEADROOM)
        sock = self.listener.adopt(self._adopted) if self._adopted else self.listener.open()
        self.selector.register(sock, selectors.EVENT_READ, self._on_accept)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, self._on_signal)
        log.info(
            "broker %s listening on %s (pid %d, uid %d, policy %s)",
            __version__, self.listener.path, os.getpid(), os.getuid(), self.config.source or "default",
        )

    def _teardown(self) -> None:
        for session in list(self.sessions.values()):
            self._close_session(session, recheck_identity=False)
        for channel in self.channels.values():
            self._release_segment(channel)
        self.selector.close()
        self.listener.close()
        if self._wakeup_w >= 0:
            signal.set_wakeup_fd(self._old_wakeup)
            for signum, handler in self._old_handlers.items():
                signal.signal(signum, handler)
            os.close(self._wakeup_r)
            os.close(self._wakeup_w)
            self._wakeup_r = self._wakeup_w = -1
        log.info("broker stopped; every segment was wiped")

    # -- the loop ----------------------------------------------------------
    def _iterate(self) -> None:
        now = time.monotonic()
        deadlines = [s.deadline for s in self.sessions.values() if s.deadline is not None]
        ping = self.notifier.seconds_until_ping(now)
        timeout = min([self._next_sweep - now, *(d - now for d in deadlines), *([ping] if ping is not None else [])])
        for key, mask in self.selector.select(max(timeout, 0.0)):
            key.data(key, mask)
        now = time.monotonic()
        # From the loop itself: a stuck loop must stop the pings.
        self.notifier.tick(now)
        self._expire_deadlines()
        # Two syscalls per live segment: on every SIGIO (a lease break) and
        # once a tick (truncation, which raises no signal, and any SIGIO
        # lost to coalescing), not after every event.
        if now >= self._next_sweep:
            self._next_sweep = now + TICK_SECONDS
            self._check_leases()

    def _on_signal(self, key: selectors.SelectorKey, mask: int) -> None:
        try:
            received = os.read(self._wakeup_r, 512)
        except BlockingIOError:
            return
        signums = set(received)
        if signal.SIGUSR1 in signums:
            self.panic()
        if signums & {signal.SIGTERM, signal.SIGINT}:
            log.info("received %s; shutting down", ", ".join(signal.Signals(s).name for s in sorted(signums & {signal.SIGTERM, signal.SIGINT})))
            self._running = False
            self.notifier.stopping()
        if signal.SIGIO in signums:
            self._next_sweep = 0.0  # a lease broke: find and wipe it before the opener's open() returns

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        for session in [s for s in self.sessions.values() if s.deadline is not None and s.deadline <= now]:
            self.events.count("handshake_timeouts")
            log.info("pid %d did not finish its handshake within %.1fs; dropped", session.peer.identity.pid, self.limits.handshake_timeout)
            self._fail(session, m.Error("timeout", f"handshake not finished within {self.limits.handshake_timeout:g}s"))

    # -- accepting -----------------------------------------------------------
    def _on_accept(self, key: selectors.SelectorKey, mask: int) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                sock, _ = key.fileobj.accept()  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE/ENFILE: leave the connection queued; the loop tick retries.
                log.error("accept failed: %s", exc.strerror)
                self.events.count("accept_errors")
                return
            self.events.count("connections_accepted")
            sock.setblocking(False)
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        if len(self.sessions) >= self.limits.max_connections:
            self._refuse(sock, m.Error("limit", f"broker is at its connection limit ({self.limits.max_connections}); try again later"))
            return
        try:
            peer = verify_peer(sock)
        except AuthError as exc:
            self._reject(sock, str(exc), None, None)
            return
        except Exception as exc:  # fail closed: an unexpected error is a rejection
            log.exception("peer verification failed unexpectedly")
            self._reject(sock, f"peer could not be verified ({type(exc).__name__})", None, None)
            return
        identity = peer.identity
        try:
            self.policy.admit(identity)
        except PermissionDenied as exc:
            peer.close()
            self._reject(sock, str(exc), identity.pid, identity.uid)
            return
        except Exception as exc:
            peer.close()
            log.exception("policy check failed unexpectedly")
            self._reject(sock, f"policy check failed ({type(exc).__name__})", identity.pid, identity.uid)
            return
        per_uid = sum(1 for s in self.sessions.values() if s.uid == identity.uid)
        if per_uid >= self.limits.max_connections_per_uid:
            peer.close()
            self._refuse(sock, m.Error("limit", f"uid {identity.uid} already has {per_uid} connections (limit {self.limits.max_connections_per_uid})"))
            return
        self._make_room_for_handshake()
        conn = Connection(Side.BROKER, max_frame_size=self.limits.max_frame_size, max_pending_frames=self.limits.max_pending_frames)
        session = Session(sock, peer, conn, time.monotonic() + self.limits.handshake_timeout)
        self.sessions[sock.fileno()] = session
        self.selector.register(sock, selectors.EVENT_READ, self._on_session)
        self.events.count("peers_verified")
        log.debug("accepted pid %d uid %d exe %s (%s)", identity.pid, identity.uid, identity.exe_path, peer.pidfd_source)

    def _make_room_for_handshake(self) -> None:
        """Keep at most max_incomplete_connections handshakes in flight.

        Refusing newcomers once the table is full (dbus-daemon) lets a
        slowloris that holds every slot lock everyone out until its
        deadlines expire.  Like OpenSSH's MaxStartups we drop early instead,
        but we drop the *oldest* handshake of the uid holding the most
        slots: a verified newcomer always gets in, and its hello+attach,
        usually already queued, completes on the next loop iteration.
        """
        incomplete = [s for s in self.sessions.values() if s.deadline is not None]
        while len(incomplete) >= self.limits.max_incomplete_connections:
            per_uid = collections.Counter(s.uid for s in incomplete)
            greediest = max(per_uid, key=lambda uid: per_uid[uid])
            victim = min((s for s in incomplete if s.uid == greediest), key=lambda s: s.deadline or 0.0)
            incomplete.remove(victim)
            self.events.count("handshakes_evicted")
            log.info(
                "%d handshakes in flight (max_incomplete_connections); dropped the oldest one, pid %d of uid %d",
                len(incomplete) + 1, victim.peer.identity.pid, victim.uid,
            )
            self._fail(victim, m.Error("limit", "too many connections are still in their handshake; dropped the oldest"))

    def _reject(self, sock: socket.socket, reason: str, pid: int | None, uid: int | None) -> None:
        if pid is None:
            try:
                pid, uid, _ = peer_credentials(sock)
            except OSError:
                pass
        self.events.record("peer_rejected", reason, pid=pid, uid=uid)
        message = reason if reason.startswith("permission denied") else f"permission denied: {reason}"
        self._refuse(sock, m.Error("permission_denied", message))

    def _refuse(self, sock: socket.socket, error: m.Error) -> None:
        """Tell a peer we will not serve it, without ever waiting on it."""
        self.events.count("connections_refused")
        frame = Connection(Side.BROKER, max_frame_size=self.limits.max_frame_size).send(error)
        _drain(sock)
        try:
            sock.send(frame)
        except OSError:
            pass
        sock.close()

    # -- sessions ------------------------------------------------------------
    def _on_session(self, key: selectors.SelectorKey, mask: int) -> None:
        session = self.sessions.get(key.fd)
        if session is None:
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(session)
            if session.sock.fileno() < 0:
                return
        if mask & selectors.EVENT_READ:
            self._read(session)

    def _read(self, session: Session) -> None:
        try:
            data, fds, flags = fdpass.recv_with_fds(session.sock, RECV_SIZE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            data, fds, flags = b"", [], 0
            if exc.errno != errno.ECONNRESET:
                log.info("read from pid %d failed: %s", session.peer.identity.pid, exc.strerror)
        if fds or flags & socket.MSG_CTRUNC:
            fdpass.close_all(fds)
            self.events.count("fd_violations")
            log.warning("pid %d sent %d file descriptor(s); closed them and dropped the client", session.peer.identity.pid, len(fds))
            self._fail(session, m.Error("protocol", "clients may not send file descriptors"))
            return
        try:
            session.conn.receive_data(data)
            self._process(session)
        except ProtocolError as exc:
            self.events.count("protocol_errors")
            log.info("protocol error from pid %d: %s", session.peer.identity.pid, exc)
            self._fail(session, m.Error("protocol", f"protocol error: {exc}"))

    def _process(self, session: Session) -> None:
        # Replies are queued while the events of one read are handled and
        # sent in one write: a pipelined hello+attach gets welcome+attached
        # in a single sendmsg, so the client wakes once, not twice.
        try:
            self._process_events(session)
        finally:
            if session.outq and session.sock.fileno() >= 0:
                self._flush(session)

    def _process_events(self, session: Session) -> None:
        while session.sock.fileno() >= 0 and not session.close_after_flush:
            event = session.conn.next_event()
            if event is NEED_DATA:
                return
            if event is CLOSED:
                self._close_session(session, recheck_identity=True)
                return
            assert isinstance(event, m.Message)
            try:
                self._handle(session, event)
            except ShmBrokerError as exc:
                code = _ERROR_CODES.get(type(exc), "internal")
                self._send(session, m.Error(code, str(exc)))
            except Exception as exc:  # never let one client's request kill the loop
                log.exception("internal error handling %s from pid %d", event.TYPE, session.peer.identity.pid)
                self._send(session, m.Error("internal", f"internal broker error ({type(exc).__name__}); see the broker log"))

    def _handle(self, session: Session, event: m.Message) -> None:
        if isinstance(event, m.Hello):
            self._send(session, m.Welcome(version=m.PROTOCOL_VERSION, broker_pid=os.getpid()))
        elif isinstance(event, m.Attach):
            self._attach(session, event)
        elif isinstance(event, m.Detach):
            reason = self._end_attachment(session, recheck_identity=True)
            self._send(session, m.Detached())
            session.close_after_flush = True
            if reason:
                log.info("pid %d detached after an identity change", session.peer.identity.pid)
            self._flush(session)
        elif isinstance(event, m.StatusRequest):
            if not self.policy.may_query_status(session.peer.identity):
                raise PermissionDenied(
                    f"permission denied: uid {session.uid} may not query status ({self.policy.status.describe()})"
                )
            self._send(session, m.StatusReply(status=self.status()))
        elif isinstance(event, m.Cursors):
            self._cursor_pages(session)
        else:  # pragma: no cover - the connection only surfaces requests
            raise ProtocolError(f"unexpected {event.TYPE}")

    def _send(self, session: Session, message: m.Message, fds: list[int] | None = None) -> None:
        # Queue duplicates, not the numbers: the reply may wait in the queue
        # (the peer is not reading) while the segment is revoked and its fd
        # closed, and the number reused for another channel's segment.
        # Duplicated before the message advances the conversation, so a
        # failure (EMFILE) leaves the connection state as it was.
        copies: list[int] = []
        try:
            for fd in fds or ():
                copies.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0))
            frame = session.conn.send(message)
        except BaseException:
            fdpass.close_all(copies)
            raise
        session.outq.append((memoryview(frame), copies))

    def _flush(self, session: Session) -> None:
        outq = session.outq
        if len(outq) > 1 and sum(1 for _, fds in outq if fds) <= 1:
            # One write for everything queued.  The fds ride with the first
            # byte of the joined buffer, i.e. no later than the frame they
            # belong to; the client collects fds as they arrive and claims
            # them when that frame is parsed.
            fds = [fd for _, frame_fds in outq for fd in frame_fds]
            joined = memoryview(b"".join(bytes(data) for data, _ in outq))
            outq.clear()
            outq.append((joined, fds))
        while outq:
            data, fds = outq[0]
            try:
                sent = fdpass.send_with_fds(session.sock, data, fds)
            except (BlockingIOError, InterruptedError):
                if not session.want_write:
                    # Write interest only: a peer that does not read its
                    # replies gets no more requests read, so the queue stays
                    # bounded by what one read produced.
                    self.selector.modify(session.sock, selectors.EVENT_WRITE, self._on_session)
                    session.want_write = True
                return
            except OSError:
                self._close_session(session, recheck_identity=True)
                return
            # SCM_RIGHTS travel with the first byte; never send them twice.
            fdpass.close_all(fds)
            if sent < len(data):
                outq[0] = (data[sent:], [])
            else:
                outq.popleft()
        if session.close_after_flush:
            self._close_session(session, recheck_identity=False)
            return
        if session.want_write:
            session.want_write = False
            try:
                self.selector.modify(session.sock, selectors.EVENT_READ, self._on_session)
            except (KeyError, ValueError):
                pass

    def _fail(self, session: Session, error: m.Error) -> None:
        """Best-effort error reply, then close; a stalled peer never blocks us."""
        try:
            frame = session.conn.send(error)
            session.sock.send(frame, socket.MSG_DONTWAIT)
        except (OSError, ValueError):
            pass
        self._close_session(session, recheck_identity=True)

    def _close_session(self, session: Session, *, recheck_identity: bool) -> None:
        if self.sessions.pop(session.sock.fileno(), None) is None:
            return
        self._end_attachment(session, recheck_identity=recheck_identity)
        try:
            self.selector.unregister(session.sock)
        except (KeyError, ValueError):
            pass
        session.sock.close()
        session.peer.close()
        for _, fds in session.outq:
            fdpass.close_all(fds)
        session.outq.clear()

    # -- attachments -------------------------------------------------------
    def _attach(self, session: Session, request: m.Attach) -> None:
        identity = session.peer.identity
        self.policy.authorize_attach(identity, request.channel, request.role)
        channel = self.channels.get(request.channel)
        if channel is None:
            channel = self._create_channel(session, request)
        elif request.size is not None and request.size != channel.spec.size:
            raise ChannelBusy(
                f"channel {request.channel!r} exists with size {channel.spec.size}, not {request.size}; "
                "attach without size= to use it as it is"
            )
        elif request.size is not None and (
            request.ring != channel.spec.ring
            or (request.max_message is not None and request.max_message != channel.spec.max_message)
        ):
            kind = f"a ring channel (max_message {channel.spec.max_message})" if channel.spec.ring else "a raw channel"
            raise ChannelBusy(f"channel {request.channel!r} exists as {kind}; attach without size= to use it as it is")
        segment = channel.segment
        if segment is None:
            segment = self._new_segment(channel)
        ring = channel.ring
        # Consumers of memfd channels get the read-only fd (see Segment):
        # they cannot change the payload.  Ring consumers write only to the
        # ring's control page and their own cursor page, memfds of their own
        # (_ring/broker.py).
        read_only = request.role == "consumer" and segment.readonly_fd >= 0
        fds, fd_names, slot = [segment.readonly_fd if read_only else segment.fd], ("segment",), None
        if ring is not None:
            try:
                if request.role == "producer":
                    other = ring.producer
                    describe = f"pid {other.peer.identity.pid}" if isinstance(other, Session) else "another peer"
                    ring_fds, ring_names = ring.attach_producer(session, channel.name, describe)
                else:
                    slot, ring_fds, ring_names = ring.attach_consumer(session, channel.name)
            except BaseException:
                if not channel.sessions:  # a segment made for this refused attach: wipe it now
                    self._release_segment(channel)
                raise
            fds, fd_names = fds + ring_fds, fd_names + ring_names
        channel.sessions.add(session)
        session.channel, session.segment, session.role, session.ring = channel, segment, request.role, ring
        session.deadline = None
        session.attached_at = time.time()
        self.events.count("attaches")
        log.info(
            "attached pid %d uid %d exe %s to channel %r as %s (size %d, generation %d)",
            identity.pid, identity.uid, identity.exe_path, channel.name, request.role, segment.size, segment.generation,
        )
        reply = m.Attached(
            channel=channel.name, role=request.role, size=segment.size,
            generation=segment.generation, layout=LAYOUT_VERSION, fds=fd_names,
            ring=ring is not None, slot=slot, start=None if ring is None or slot is None else ring.starts[slot],
        )
        self._send(session, reply, fds)

    def _cursor_pages(self, session: Session) -> None:
        """The ring's producer asks for its consumers' cursor pages (docs/ring.md, "cursors").

        Nobody else gets them: a consumer holding another's page could move
        that cursor, which is the attack the pages exist to stop."""
        ring = session.ring
        if ring is None or session.channel is None:
            raise PermissionDenied(
                "permission denied: only the producer attached to a ring channel may fetch its consumers' cursor pages"
            )
        # RingState decides who its producer is (and refuses once closed).
        slots, serials, fds = ring.cursor_pages(session, session.channel.name)
        self._send(session, m.CursorPages(slots=tuple(slots), serials=tuple(serials)), fds)

    def _create_channel(self, session: Session, request: m.Attach) -> Channel:
        identity = session.peer.identity
        if request.size is None:
            raise ChannelNotFound(
                f"channel {request.channel!r} does not exist; a producer creates it by attaching with size=N"
            )
        if not self.policy.may_create(identity, request.channel, request.role):
            if request.role != "producer":
                raise ChannelNotFound(
                    f"channel {request.channel!r} does not exist and only producers may create channels"
                )
            raise PermissionDenied(
                f"permission denied: uid {identity.uid} may not create channel {request.channel!r} "
                "(no rule with create = true covers it)"
            )
        limits = self.limits
        if request.size > limits.max_segment_size:
            raise LimitExceeded(f"size {request.size} exceeds the broker's max_segment_size ({limits.max_segment_size})")
        if self._segments_by_uid[identity.uid] >= limits.max_segments_per_uid:
            raise LimitExceeded(f"uid {identity.uid} already owns {limits.max_segments_per_uid} channels (max_segments_per_uid)")
        if self._bytes_by_uid[identity.uid] + request.size > limits.max_bytes_per_uid:
            raise LimitExceeded(
                f"uid {identity.uid} would own {self._bytes_by_uid[identity.uid] + request.size} bytes of segments, "
                f"over max_bytes_per_uid ({limits.max_bytes_per_uid})"
            )
        max_message = None
        if request.ring:
            try:
                max_message = resolve_max_message(request.size, request.max_message)
            except ValueError as exc:
                raise LimitExceeded(f"cannot create ring channel {request.channel!r}: {exc}") from None
        elif request.max_message is not None:
            raise LimitExceeded("max_message applies to ring channels only; pass ring=True")
        spec = ChannelSpec(name=request.channel, size=request.size, ring=request.ring, max_message=max_message)
        channel = Channel(spec, configured=False, owner_uid=identity.uid)
        self.channels[channel.name] = channel
        self._segments_by_uid[identity.uid] += 1
        self._bytes_by_uid[identity.uid] += request.size
        log.info("uid %d created channel %r (%d bytes)", identity.uid, channel.name, request.size)
        return channel

    def _new_segment(self, channel: Channel) -> Segment:
        try:
            segment = Segment.create(
                channel.spec.size, channel.generation + 1, backend=channel.spec.backend,
                flags=FLAG_RING if channel.spec.ring else 0,
                on_lease_failure=lambda: self.events.count("lease_failures"),
            )
            if channel.spec.ring:
                assert channel.spec.max_message is not None
                try:
                    channel.ring = RingState(channel.spec.size, channel.spec.max_message)
                except BaseException:
                    segment.close()
                    raise
        except OSError as exc:
            if not channel.configured and not channel.sessions:
                self._forget_channel(channel)
            raise LimitExceeded(f"could not create a segment for {channel.name!r}: {exc.strerror or exc}") from None
        channel.generation = segment.generation
        channel.segment = segment
        self.events.count("segments_created")
        return segment

    def _end_attachment(self, session: Session, *, recheck_identity: bool) -> str | None:
        channel, segment = session.channel, session.segment
        if channel is None:
            return None
        session.channel = session.segment = None
        channel.sessions.discard(session)
        if session.ring is not None:
            session.ring.detach(session)  # frees a consumer slot so it cannot stall the producer
            session.ring = None
        self.events.count("detaches")
        reason = recheck(session.peer) if recheck_identity else None
        identity = session.peer.identity
        if reason is not None:
            self.events.record("identity_changed", reason, pid=identity.pid, uid=identity.uid, channel=channel.name)
            if segment is not None and segment is channel.segment:
                self._revoke(channel)
        log.info("detached pid %d from channel %r", identity.pid, channel.name)
        if not channel.sessions:
            self._release_segment(channel)
        elif session.role == "producer":
            self._apply_liveness_rule(channel)
        return reason

    def _apply_liveness_rule(self, channel: Channel) -> None:
        """``wipe_when = "producer_gone"``: no producer left, so wipe for the consumers too."""
        if channel.spec.wipe_when != "producer_gone" or channel.segment is None:
            return
        if any(s.role == "producer" for s in channel.sessions):
            return
        generation = channel.segment.generation
        self._revoke(channel)
        self.events.count("liveness_wipes")
        log.info("last producer of channel %r left; wiped and revoked generation %d (wipe_when = producer_gone)", channel.name, generation)

    def _revoke(self, channel: Channel) -> None:
        """Wipe the channel's segment for everyone attached and stop handing it out."""
        segment = channel.segment
        if segment is None:
            return
        try:
            segment.wipe()
            self.events.count("segments_wiped")
        except OSError as exc:
            # e.g. ENOSPC restoring a truncated segment's pages: the object
            # is still closed below and never handed out again; peers keep
            # what they mapped, which is why this is a security event.
            self.events.record(
                "wipe_failed", f"could not wipe the segment of channel {channel.name!r}: {exc.strerror or exc}",
                channel=channel.name,
            )
        self._close_ring(channel)
        segment.close()
        channel.segment = None

    def _close_ring(self, channel: Channel) -> None:
        """After a wipe: wake every sleeping peer so it sees the revoked word, close the eventfds."""
        if channel.ring is not None:
            channel.ring.close()
            channel.ring = None

    def _release_segment(self, channel: Channel) -> None:
        """Nobody is attached any more: zeroize and free the memory."""
        if channel.segment is not None:
            self._revoke(channel)
        if not channel.configured and not channel.sessions:
            self._forget_channel(channel)

    def _forget_channel(self, channel: Channel) -> None:
        if self.channels.get(channel.name) is channel:
            del self.channels[channel.name]
            if channel.owner_uid is not None:
                self._segments_by_uid[channel.owner_uid] -= 1
                self._bytes_by_uid[channel.owner_uid] -= channel.spec.size

    # -- intrusions and panic ------------------------------------------------
    def _check_leases(self) -> None:
        for channel in list(self.channels.values()):
            segment = channel.segment
            if segment is None:
                continue
            if segment.truncated():
                # A peer ftruncate()d an unsealable (posix) segment.  Wiping
                # by pwrite restores the size, so peers that have not touched
                # the mapping yet see a revoked segment instead of SIGBUS.
                kind, detail = "segment_truncated", (
                    "was truncated by a peer holding it; size restored, wiped and revoked "
                    '(use backend = "memfd" to seal it)'
                )
            elif not segment.lease_intact():
                # Someone open()ed the unlinked object (root through
                # /proc/PID/fd/N).  _revoke wipes before it releases the lease:
                # the opener's open() is blocked until then, so it sees zeros.
                kind, detail = "lease_broken", "was opened or truncated by another process; wiped and revoked"
            else:
                continue
            self.events.record(
                kind, f"segment of channel {channel.name!r} (generation {segment.generation}) {detail}",
                channel=channel.name,
            )
            self._revoke(channel)

    def panic(self) -> None:
        """SIGUSR1: wipe and revoke every segment at once."""
        wiped = 0
        for channel in self.channels.values():
            if channel.segment is not None:
                self._revoke(channel)
                wiped += 1
        self.events.record("panic_wipe", f"panic signal: wiped and revoked {wiped} segment(s)")

    # -- status ----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        channels = []
        for channel in sorted(self.channels.values(), key=lambda c: c.name):
            peers = [
                {
                    "pid": s.peer.identity.pid,
                    "uid": s.peer.identity.uid,
                    "gid": s.peer.identity.gid,
                    "exe": s.peer.identity.exe_path,
                    "role": s.role,
                    "generation": s.segment.generation if s.segment else None,
                    "attached_at": s.attached_at,
                }
                for s in sorted(channel.sessions, key=lambda s: s.attached_at or 0)
            ]
            channels.append(
                {
                    "name": channel.name,
                    "size": channel.spec.size,
                    "backend": channel.spec.backend,
                    "ring": channel.spec.ring,
                    "max_message": channel.spec.max_message,
                    "configured": channel.configured,
                    "generation": channel.generation,
                    "live": channel.segment is not None,
                    "peers": peers,
                }
            )
        return {
            "broker": {
                "version": __version__,
                "pid": os.getpid(),
                "uid": os.getuid(),
                "socket": self.listener.path,
                "started": self.started,
                "policy": self.config.source or "default",
            },
            "channels": channels,
            "connections": len(self.sessions),
            "counters": dict(sorted(self.events.counters.items())),
            "security_events": [e.as_dict() for e in self.events.events],
        }


def _ensure_fd_headroom(wanted: int) -> None:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (systemd's default
    soft limit of 1024 would cap us near 500 connections), so the per-uid
    and total connection caps, not EMFILE, are what a flood runs into."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
            soft = new_soft
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "RLIMIT_NOFILE is %d but limits.max_connections needs about %d fds; raise the hard limit "
            "(e.g. LimitNOFILE= in the unit) or lower max_connections", soft, wanted,
        )


def _note_signal(signum: int, frame: object) -> None:
    """Do nothing: set_wakeup_fd already queued the signal number for the loop."""


def _drain(sock: socket.socket) -> None:
    """Read and discard what a refused peer sent, closing any fds it passed.

    Closing an AF_UNIX socket with unread data makes the peer's next read fail
    with ECONNRESET before it sees our error frame; draining first lets the
    refusal reason reach it.
    """
    for _ in range(4):
        try:
            data, fds, _ = fdpass.recv_with_fds(sock, RECV_SIZE, socket.MSG_DONTWAIT)
        except OSError:
            return
        fdpass.close_all(fds)
        if not data:
            return
