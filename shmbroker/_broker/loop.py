"""The broker's event loop: wires the listener, peer verification, policy,
segments and the sans-IO protocol together.  It holds no policy of its own.

Single-threaded on purpose: every state change happens here, signals arrive
through ``signal.set_wakeup_fd`` and are handled between events (never inside
a signal handler), and deadlines are checked by the loop, not by alarms.

Work per peer is bounded and shared fairly (docs/attacks.md, A7 and A8):

* accept() and SO_PEERCRED are all a connection costs until its uid's turn:
  verifying it, each of its requests and each step of the segment work it
  causes are tasks queued under its uid (scheduler.py), and every uid with
  work gets one time quantum per loop round;
* a session has at most one request in flight end to end: the next one is
  not read from its buffer until the reply to the last one is written, and,
  if that reply carried fds, read by the peer (SIOCOUTQ); a session with
  input waiting is not read from at all, so the kernel's socket buffer, not
  ours, holds what a pipelining peer sends;
* everything a peer makes the broker hold is charged to its uid
  (quota.py), file descriptors included, against per-uid and total caps
  that leave the broker its own reserve, so floods meet ``LimitExceeded``
  and never EMFILE; should EMFILE come from outside anyway, a reserve fd
  lets the loop shed connections instead of spinning on them;
* refusals of uids no rule names are rate-limited per uid (ratelimit.py).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import resource
import select
import selectors
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from .. import __version__
from .._layout import FLAG_RING, LAYOUT_VERSION
from .._ring import layout as ring_layout
from .._ring.broker import CONSUMER_FD_NAMES, RingState, producer_fd_names
from .._ring.layout import resolve_max_message
from .._sys import eventfd, fdpass
from .._sys.peercred import peer_credentials, peer_groups
from .._sys.sdnotify import Notifier
from .._sys.sockqueue import unread_bytes
from .._wire import messages as m
from .._wire.connection import CLOSED, NEED_DATA, Connection, Side
from ..errors import (
    ChannelBusy,
    ChannelNotFound,
    ChannelRevoked,
    LimitExceeded,
    PermissionDenied,
    ProtocolError,
    ShmBrokerError,
)
from . import auth
from . import confinement
from .auth import AuthError, VerifiedPeer, recheck, verify_peer
from .config import BrokerConfig, ChannelSpec, check_broker_user
from .events import EventKind, EventLog
from .listener import LISTEN_BACKLOG, Listener
from .outbox import Outbox, duplicate
from .policy import Identity
from .quota import Charge, Ledger, Resource
from .ratelimit import RateLimiter
from .scheduler import FairScheduler
from .segments import STEP_BYTES, Segment

log = logging.getLogger(__name__)

# How often the loop wakes up with nothing to do, to enforce deadlines and
# to re-check leases in case a SIGIO was coalesced with another signal.
TICK_SECONDS = 1.0
# Largest read per recvmsg; frames are far smaller (limits.max_frame_size).
RECV_SIZE = 64 * 1024
# Accepts per loop iteration: the whole backlog.  accept() and SO_PEERCRED
# are cheap and the costly verification waits for its uid's turn, so a
# newcomer never queues behind more than one backlog of another uid's flood.
ACCEPT_BURST = LISTEN_BACKLOG
# The soft RLIMIT_NOFILE the broker raises itself to (within the hard
# limit): systemd's default soft limit of 1024 would cap it near 500 peers.
FD_TARGET = 65536
# Descriptors kept out of every peer's reach beyond those open at start
# (listener, selector, inspector, pinned executables): /proc reads, the
# reserve fd's round trip, a log file being rotated.
FD_SPARE = 32
# fds the broker itself holds for a segment beyond the segment's own: a
# ring's control and index pages, the index page's read-only twin, and the
# producer's and every consumer slot's eventfd (_ring/broker.py).
RING_FDS = 4 + ring_layout.MAX_CONSUMERS
# A session's own fds: its socket and the pidfd pinning its peer.
SESSION_FDS = 2
# A peer that sent its next request before reading the fds of our last
# reply is asked again (SIOCOUTQ) after these delays, doubling: quick for a
# peer that reads a moment later, cheap for one that never does.
UNREAD_RECHECK_MIN = 0.002
UNREAD_RECHECK_MAX = TICK_SECONDS

_ERROR_CODES: dict[type[ShmBrokerError], str] = {
    PermissionDenied: "permission_denied",
    ChannelNotFound: "not_found",
    ChannelBusy: "conflict",
    LimitExceeded: "limit",
    ProtocolError: "protocol",
    ChannelRevoked: "revoked",
}


class Channel:
    """A named channel; it holds a segment only while someone is attached."""

    def __init__(self, spec: ChannelSpec, *, configured: bool) -> None:
        self.spec = spec
        self.configured = configured
        self.segment: Segment | None = None
        self.ring: RingState | None = None  # with the segment, for ring channels
        self.generation = 0
        # Sessions attached to the current segment: what decides when it is
        # wiped (last detach, wipe_when).  Sessions still connected to a
        # segment revoked since are only remembered, for status.
        self.sessions: set[Session] = set()
        self.revoked_sessions: set[Session] = set()
        # Attach requests waiting for the segment's pages to be reserved.
        self.waiting: list[tuple[Session, m.Attach]] = []

    @property
    def name(self) -> str:
        return self.spec.name


class Unverified:
    """An accepted connection waiting for its uid's turn to be verified; nothing is read from it."""

    __slots__ = ("sock", "pid", "uid", "gid", "groups", "charge", "deadline", "closed")

    def __init__(
        self, sock: socket.socket, credentials: tuple[int, int, int], groups: tuple[int, ...], charge: Charge, deadline: float,
    ) -> None:
        self.sock = sock
        self.pid, self.uid, self.gid = credentials
        self.groups = groups
        self.charge = charge
        self.deadline = deadline
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()
            self.charge.release()


class Session:
    """One accepted connection from a verified peer."""

    def __init__(self, sock: socket.socket, peer: VerifiedPeer, conn: Connection, deadline: float, charge: Charge) -> None:
        self.sock = sock
        self.peer = peer
        self.conn = conn
        self.deadline: float | None = deadline  # the handshake's; None once attached
        self.charge = charge  # the connection, its socket and pidfd
        # fds of the last reply that carried some, until the peer has read
        # them: in flight they are charged to the broker's user by the kernel.
        self.reply_charge: Charge | None = None
        self.attachment_charge: Charge | None = None  # a ring consumer's cursor page
        self.outbox = Outbox()
        self.channel: Channel | None = None
        self.segment: Segment | None = None
        self.ring: RingState | None = None
        self.role: str | None = None
        self.attached_at: float | None = None
        self.input = False  # bytes were read that may hold a request (or the end)
        self.queued = False  # a task of this session is in the scheduler
        self.parked = False  # its request waits for a segment's pages
        self.close_after_flush = False
        self.interest = 0  # selector events registered for the socket
        self.closed = False
        self.recheck_at = 0.0  # when to ask again whether the peer read our fds
        self.recheck_delay = 0.0

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
        self.limits = limits = config.limits
        self.listener = Listener(socket_path, config.socket_group)
        self._adopted = listen_socket
        self._on_ready = on_ready
        self.notifier = notifier or Notifier(None, None)
        self.events = EventLog()
        self.channels: dict[str, Channel] = {
            name: Channel(spec, configured=True) for name, spec in config.channels.items()
        }
        self.sessions: dict[int, Session] = {}
        self._unverified: set[Unverified] = set()
        self.selector = selectors.DefaultSelector()
        self.scheduler = FairScheduler()
        self.ledger = Ledger(
            per_uid={
                Resource.CONNECTIONS: limits.max_connections_per_uid,
                Resource.SEGMENTS: limits.max_segments_per_uid,
                Resource.BYTES: limits.max_bytes_per_uid,
                Resource.FDS: limits.fds_per_uid,
            },
            total={Resource.CONNECTIONS: limits.max_connections},  # FDS: set once the rlimit is known
        )
        self._refusals = RateLimiter(limits.refusals_per_uid_burst, limits.refusal_window)
        # Sessions whose next request waits until the peer read our last fds.
        self._waiting_read: set[Session] = set()
        # Sessions holding a reply charge (checked each tick, so idle peers give it back).
        self._unread: set[Session] = set()
        # Sockets of closed sessions whose peer still has not read fds we sent
        # (and keeps its end open): the fds stay in flight, so the charge stays.
        self._lingering: list[tuple[socket.socket, list[Charge]]] = []
        # Segments being wiped in steps, with the charge of their creator.
        self._wiping: dict[Segment, Charge] = {}
        self._segment_charges: dict[Segment, Charge] = {}
        self.started = time.time()
        self._euid = os.geteuid()  # owns every segment and page this broker creates
        self._running = False
        self._wakeup_r = -1
        self._wakeup_w = -1
        self._old_wakeup = -1
        self._old_handlers: dict[int, Any] = {}
        self._reserve_fd = -1
        self._listening = False
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
            try:
                self._teardown()
            finally:
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
        # An eventfd, not /dev/null: Landlock would refuse to reopen a path.
        self._reserve_fd = eventfd.create()
        sock = self.listener.adopt(self._adopted) if self._adopted else self.listener.open()
        self.selector.register(sock, selectors.EVENT_READ, self._on_accept)
        self._listening = True
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, self._on_signal)
        self.ledger.total[Resource.FDS] = _fd_budget(self.limits.max_connections, self.limits.fds_per_uid)
        log.info(
            "broker %s listening on %s (pid %d, uid %d, policy %s)",
            __version__, self.listener.path, os.getpid(), os.getuid(), self.config.source or "default",
        )

    def _teardown(self) -> None:
        """Wipe everything and close everything, whatever fails on the way."""
        steps: list[Callable[[], None]] = [
            *(lambda s=s: self._close_session(s, recheck_identity=False) for s in list(self.sessions.values())),
            *(pending.close for pending in list(self._unverified)),
            *(lambda c=c: self._release_segment(c, at_once=True) for c in list(self.channels.values())),
            self._finish_wipes,
            self._close_lingering,  # after the sessions: closing them may add some
            self.selector.close,
            self.listener.close,
            self._restore_signals,
        ]
        for step in steps:
            try:
                step()
            except Exception:
                log.exception("error while shutting down; continuing")
        self._unverified.clear()
        if self._reserve_fd >= 0:
            os.close(self._reserve_fd)
            self._reserve_fd = -1
        log.info("broker stopped; every segment was wiped")

    def _close_lingering(self) -> None:
        for sock, charges in self._lingering:
            sock.close()
            for charge in charges:
                charge.release()
        self._lingering.clear()

    def _restore_signals(self) -> None:
        if self._wakeup_w >= 0:
            signal.set_wakeup_fd(self._old_wakeup)
            for signum, handler in self._old_handlers.items():
                signal.signal(signum, handler)
            os.close(self._wakeup_r)
            os.close(self._wakeup_w)
            self._wakeup_r = self._wakeup_w = -1

    # -- the loop ----------------------------------------------------------
    def _iterate(self) -> None:
        now = time.monotonic()
        if self.scheduler:
            timeout = 0.0  # work is waiting: only look for new events
        else:
            deadlines = [s.deadline for s in self.sessions.values() if s.deadline is not None]
            deadlines += [p.deadline for p in self._unverified]
            deadlines += [s.recheck_at for s in self._waiting_read]
            ping = self.notifier.seconds_until_ping(now)
            timeout = min([self._next_sweep - now, *(d - now for d in deadlines), *([ping] if ping is not None else [])])
        for key, mask in self.selector.select(max(timeout, 0.0)):
            key.data(key, mask)
        self.scheduler.run_round()
        now = time.monotonic()
        self._recheck_unread(now)
        # From the loop itself: a stuck loop must stop the pings.
        self.notifier.tick(now)
        self._expire_deadlines(now)
        # Two syscalls per live segment: on every SIGIO (a lease break) and
        # once a tick (truncation, which raises no signal, and any SIGIO
        # lost to coalescing), not after every event.
        if now >= self._next_sweep:
            self._next_sweep = now + TICK_SECONDS
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        self._check_leases()
        for session in list(self._unread):
            if not session.outbox and self._reply_read(session):
                self._settle(session)
        for index in range(len(self._lingering) - 1, -1, -1):
            sock, charges = self._lingering[index]
            if _unread(sock) == 0:
                sock.close()
                for charge in charges:
                    charge.release()
                del self._lingering[index]
        for uid, dropped in self._refusals.expired(now):
            self.events.record(
                EventKind.REFUSALS_SUPPRESSED,
                f"uid {uid} caused {dropped} more refusal(s) or security event(s) in the last "
                f"{self.limits.refusal_window:g}s, counted but not answered, logged or kept one by one "
                "(refusals_per_uid_burst)",
                uid=int(uid) if isinstance(uid, int) else None,
            )
        if not self._listening and self._reserve_fd < 0:
            try:
                self._reserve_fd = eventfd.create()
            except OSError:
                pass
        if not self._listening and self._reserve_fd >= 0 and self.listener.sock is not None:
            self.selector.register(self.listener.sock, selectors.EVENT_READ, self._on_accept)
            self._listening = True

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

    def _expire_deadlines(self, now: float) -> None:
        for pending in [p for p in self._unverified if p.deadline <= now]:
            self.events.count("handshake_timeouts")
            self._unverified.discard(pending)
            pending.close()
        for session in [s for s in self.sessions.values() if s.deadline is not None and s.deadline <= now]:
            self.events.count("handshake_timeouts")
            log.info("pid %d did not finish its handshake within %.1fs; dropped", session.peer.identity.pid, self.limits.handshake_timeout)
            self._fail(session, m.Error("timeout", f"handshake not finished within {self.limits.handshake_timeout:g}s"))

    # -- accepting -----------------------------------------------------------
    def _on_accept(self, key: selectors.SelectorKey, mask: int) -> None:
        listener: socket.socket = key.fileobj  # type: ignore[assignment]
        for _ in range(ACCEPT_BURST):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.events.count("accept_errors")
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._shed(listener, exc)
                else:
                    log.error("accept failed: %s", exc.strerror)
                return
            self.events.count("connections_accepted")
            self._admit(sock)

    def _shed(self, listener: socket.socket, exc: OSError) -> None:
        """Out of fds: close the reserve, accept and close what waits, reopen it.

        A connection left in the backlog keeps the listener readable, and a
        level-triggered loop would spin on it (libuv's emfile trick)."""
        shed = 0
        if self._reserve_fd >= 0:
            os.close(self._reserve_fd)
            self._reserve_fd = -1
            for _ in range(ACCEPT_BURST):
                try:
                    sock, _ = listener.accept()
                except OSError:
                    break
                sock.close()
                shed += 1
            try:
                self._reserve_fd = eventfd.create()
            except OSError:
                pass
        if self._reserve_fd < 0:
            # No reserve to trade: stop listening until the next tick.
            self.selector.unregister(listener)
            self._listening = False
        self.events.count("connections_shed", shed)
        log.error(
            "accept failed (%s): the broker is out of file descriptors; closed %d waiting connection(s)%s",
            exc.strerror, shed, "" if self._listening else ", not accepting until the next tick",
        )

    def _admit(self, sock: socket.socket) -> None:
        if _hung_up(sock):
            # connect, send, close before we even looked: nothing to answer.
            self.events.count("hung_up_unverified")
            sock.close()
            return
        sock.setblocking(False)
        try:
            credentials = peer_credentials(sock)
            groups = peer_groups(sock)
        except OSError:
            sock.close()
            return
        pid, uid, gid = credentials
        now = time.monotonic()
        try:
            self.policy.check_connect(uid, gid, groups)
        except PermissionDenied as exc:
            if self._refusals.limited(uid, now):
                # Past its burst: not worth an answer, a log line or an event each.
                self._refusals.note_dropped(uid, now)
                self.events.count("connections_dropped")
                sock.close()
            else:
                self._reject(sock, str(exc), pid, uid)
            return
        try:
            charge = self.ledger.charge(uid, connections=1, fds=SESSION_FDS)
        except LimitExceeded as exc:
            self._refuse(sock, m.Error("limit", str(exc)))
            return
        pending = Unverified(sock, credentials, groups, charge, now + self.limits.handshake_timeout)
        self._unverified.add(pending)
        self.scheduler.add(uid, lambda: self._verify(pending), new=True)

    def _verify(self, pending: Unverified) -> bool:
        """The uid's turn: verify the peer before a single byte of it is read."""
        if pending.closed:
            return False
        self._unverified.discard(pending)
        sock, pid, uid = pending.sock, pending.pid, pending.uid
        if _hung_up(sock):
            # Gone before its turn: nothing can reach it any more, so it is
            # not worth a verification (a flood of connect-and-close would
            # otherwise buy one /proc inspection each).
            self.events.count("hung_up_unverified")
            pending.close()
            return False
        try:
            peer = verify_peer(sock, (pending.pid, pending.uid, pending.gid))
        except AuthError as exc:
            pending.charge.release()
            self._reject(sock, str(exc), pid, uid)
            return False
        except Exception as exc:  # fail closed: an unexpected error is a rejection
            log.exception("peer verification failed unexpectedly")
            pending.charge.release()
            self._reject(sock, f"peer could not be verified ({type(exc).__name__})", pid, uid)
            return False
        identity = peer.identity
        try:
            self.policy.admit(identity)
        except Exception as exc:
            peer.close()
            pending.charge.release()
            if not isinstance(exc, PermissionDenied):
                log.exception("policy check failed unexpectedly")
                exc = PermissionDenied(f"policy check failed ({type(exc).__name__})")
            self._reject(sock, str(exc), identity.pid, identity.uid)
            return False
        self._make_room_for_handshake()
        conn = Connection(Side.BROKER, max_frame_size=self.limits.max_frame_size, max_pending_frames=self.limits.max_pending_frames)
        session = Session(sock, peer, conn, pending.deadline, pending.charge)
        self.sessions[sock.fileno()] = session
        self.events.count("peers_verified")
        log.debug("accepted pid %d uid %d exe %s (%s)", identity.pid, identity.uid, identity.exe_path, peer.pidfd_source)
        # Its hello and first request are usually waiting already: read them
        # now rather than after another turn of the loop.
        self._read(session)
        return False

    def _make_room_for_handshake(self) -> None:
        """Keep at most max_incomplete_connections verified handshakes in flight.

        Refusing newcomers once the table is full (dbus-daemon) lets a
        slowloris that holds every slot lock everyone out until its
        deadlines expire.  Like OpenSSH's MaxStartups we drop early instead,
        but we drop the *oldest* handshake of the uid holding the most
        slots: a verified newcomer always gets in, and its hello+attach,
        usually already queued, completes on its uid's next turn.
        Connections still waiting to be verified wait on the broker, not on
        their peer, so they hold no slot (their uid's connection quota
        bounds them).
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

    def _peer_event(
        self, kind: EventKind, detail: str, *, pid: int | None, uid: int | None, channel: str | None = None
    ) -> None:
        """Record an event a peer caused, within its uid's burst; past it, only count it."""
        if uid is None or self._refusals.allow(uid, time.monotonic()):
            self.events.record(kind, detail, pid=pid, uid=uid, channel=channel)
        else:
            self.events.count(kind.value)
            self.events.count("events_suppressed")

    def _reject(self, sock: socket.socket, reason: str, pid: int | None, uid: int | None) -> None:
        self._peer_event(EventKind.PEER_REJECTED, reason, pid=pid, uid=uid)
        message = reason if reason.startswith("permission denied") else f"permission denied: {reason}"
        self._refuse(sock, m.Error("permission_denied", message))

    def _refuse(self, sock: socket.socket, error: m.Error) -> None:
        """Tell a peer we will not serve it, without ever waiting on it."""
        self.events.count("connections_refused")
        frame = Connection(Side.BROKER, max_frame_size=self.limits.max_frame_size).send(error)
        _drain(sock)
        try:
            sock.send(frame, socket.MSG_DONTWAIT)
        except OSError:
            pass
        sock.close()

    # -- sessions: I/O ---------------------------------------------------------
    def _on_session(self, key: selectors.SelectorKey, mask: int) -> None:
        session = self.sessions.get(key.fd)
        if session is None:
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(session)
        elif mask & selectors.EVENT_READ:
            self._read(session)

    def _read(self, session: Session) -> None:
        try:
            data, fds, flags, sender = fdpass.recv_with_sender(session.sock, RECV_SIZE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            self._settle(session)  # nothing yet: wait for it
            return
        except OSError as exc:
            data, fds, flags, sender = b"", [], 0, None
            if exc.errno != errno.ECONNRESET:
                log.info("read from pid %d failed: %s", session.peer.identity.pid, exc.strerror)
        if data and sender is not None and sender != session.peer.identity.pid:
            fdpass.close_all(fds)
            self._handed_over(session, sender)
            return
        if fds or flags & socket.MSG_CTRUNC:
            fdpass.close_all(fds)
            self.events.count("fd_violations")
            log.warning("pid %d sent %d file descriptor(s); closed them and dropped the client", session.peer.identity.pid, len(fds))
            self._fail(session, m.Error("protocol", "clients may not send file descriptors"))
            return
        try:
            session.conn.receive_data(data)
        except ProtocolError as exc:
            self._protocol_error(session, exc)
            return
        session.input = True
        self._settle(session)

    def _handed_over(self, session: Session, sender: int) -> None:
        """Another process wrote on a verified connection (SO_PASSCRED says
        who sent each write): the socket was passed on (SCM_RIGHTS, or
        inherited by a child).  Nothing it asks for is answered."""
        identity = session.peer.identity
        who = f"pid {sender}" if sender > 0 else "a process outside the broker's pid namespace"
        self._peer_event(
            EventKind.IDENTITY_CHANGED,
            f"{who} wrote on the connection verified for pid {identity.pid} ({identity.exe_path}): "
            "the socket was handed to another process; the connection was closed",
            pid=identity.pid, uid=identity.uid, channel=session.channel.name if session.channel else None,
        )
        self._fail(session, m.Error(
            "permission_denied",
            f"permission denied: this connection was verified for pid {identity.pid}, not for the process "
            "writing on it; connect anew",
        ))

    def _settle(self, session: Session) -> None:
        """Register the session for what it waits for, or queue its next request.

        It is read from only when nothing of it waits here: a peer that
        pipelines fills its own socket buffer, not the broker's memory."""
        if session.closed:
            return
        if session.outbox:
            self._want(session, selectors.EVENT_WRITE)
        elif session.parked:
            self._want(session, 0)
        elif session.input:
            self._want(session, 0)
            if not session.queued:
                session.queued = True
                self.scheduler.add(session.uid, lambda: self._step(session))
        else:
            self._want(session, selectors.EVENT_READ)

    def _want(self, session: Session, events: int) -> None:
        if session.interest == events:
            return
        if events == 0:
            self.selector.unregister(session.sock)
        elif session.interest == 0:
            self.selector.register(session.sock, events, self._on_session)
        else:
            self.selector.modify(session.sock, events, self._on_session)
        session.interest = events

    def _step(self, session: Session) -> bool:
        """The session's turn: handle one request; True to be called again."""
        if session.closed or session.outbox or session.parked:
            session.queued = False
            return False
        if session.conn.request_waiting and session.reply_charge is not None and not self._reply_read(session):
            # The peer has not read the fds we sent it last: nothing more
            # from it until it does (asked again with a growing delay).
            session.queued = False
            session.recheck_delay = UNREAD_RECHECK_MIN
            session.recheck_at = time.monotonic() + session.recheck_delay
            self._waiting_read.add(session)
            return False
        try:
            event = session.conn.next_event()
        except ProtocolError as exc:
            session.queued = False
            self._protocol_error(session, exc)
            return False
        if event is NEED_DATA:
            session.queued = False
            session.input = False
            self._settle(session)
            return False
        if event is CLOSED:
            session.queued = False
            self._close_session(session, recheck_identity=True)
            return False
        assert isinstance(event, m.Message)
        self._run_request(session, event)
        if session.closed:
            session.queued = False
            return False
        if session.outbox:
            self._flush(session)
        if session.closed or session.outbox or session.parked:
            session.queued = False
            self._settle(session)
            return False
        return True

    def _run_request(self, session: Session, request: m.Message) -> None:
        try:
            self._handle(session, request)
        except ShmBrokerError as exc:
            self._reply_error(session, m.Error(_ERROR_CODES.get(type(exc), "internal"), str(exc)))
        except Exception as exc:  # never let one client's request kill the loop
            log.exception("internal error handling %s from pid %d", request.TYPE, session.peer.identity.pid)
            self._reply_error(session, m.Error("internal", f"internal broker error ({type(exc).__name__}); see the broker log"))

    def _reply_error(self, session: Session, error: m.Error) -> None:
        try:
            self._reply(session, error)
        except Exception:
            log.exception("could not queue an error reply for pid %d", session.peer.identity.pid)
            self._close_session(session, recheck_identity=True)

    def _protocol_error(self, session: Session, exc: ProtocolError) -> None:
        self.events.count("protocol_errors")
        log.info("protocol error from pid %d: %s", session.peer.identity.pid, exc)
        self._fail(session, m.Error("protocol", f"protocol error: {exc}"))

    def _recheck_unread(self, now: float) -> None:
        for session in [s for s in self._waiting_read if s.recheck_at <= now]:
            if self._reply_read(session):
                self._settle(session)
            else:
                session.recheck_delay = min(session.recheck_delay * 2, UNREAD_RECHECK_MAX)
                session.recheck_at = now + session.recheck_delay

    def _reply_read(self, session: Session) -> bool:
        """True (and the reply's fd charge released) once the peer read our last fds."""
        if _unread(session.sock):
            return False
        if session.reply_charge is not None:
            session.reply_charge.release()
            session.reply_charge = None
        self._unread.discard(session)
        self._waiting_read.discard(session)
        return True

    def _reply(self, session: Session, message: m.Message, fds: list[int] | None = None, charge: Charge | None = None) -> None:
        """Queue ``message`` (with copies of ``fds``, whose charge the caller made) and try to send it.

        The broker's only way to talk to a session: everything goes through
        the outbox, in order, so no frame is ever written into the middle of
        another."""
        copies: list[int] = []
        try:
            # Duplicated before the message advances the conversation, so a
            # failure (EMFILE) leaves the connection state as it was.
            copies = duplicate(fds or [])
            frame = session.conn.send(message)
        except BaseException as exc:
            fdpass.close_all(copies)
            if charge is not None:
                charge.release()
            if isinstance(exc, OSError):
                raise LimitExceeded(f"the broker is out of file descriptors ({exc.strerror}); try again later") from None
            raise
        session.outbox.put_owned(frame, copies)
        if charge is not None:
            if session.reply_charge is not None:
                session.reply_charge.release()  # cannot happen: one fd reply is read before the next request
            session.reply_charge = charge
            self._unread.add(session)

    def _charge_reply(self, session: Session, nfds: int) -> Charge:
        """Charge the fds of a reply before anything changes for it (LimitExceeded otherwise)."""
        return self.ledger.charge(session.uid, fds=nfds)

    def _flush(self, session: Session) -> None:
        try:
            done = session.outbox.flush(session.sock)
        except OSError:
            self._close_session(session, recheck_identity=True)
            return
        if not done:
            self._want(session, selectors.EVENT_WRITE)
            return
        if session.close_after_flush:
            self._close_session(session, recheck_identity=False)
            return
        self._settle(session)

    def _fail(self, session: Session, error: m.Error) -> None:
        """Best-effort error reply, then close; a stalled peer never blocks us.

        The error goes through the outbox behind anything already queued, so
        a partly sent frame is finished first or the error is not sent."""
        try:
            session.outbox.put_owned(session.conn.send(error), [])
            session.outbox.flush(session.sock)
        except (OSError, ValueError):
            pass
        self._close_session(session, recheck_identity=True)

    def _close_session(self, session: Session, *, recheck_identity: bool) -> None:
        if session.closed:
            return
        session.closed = True
        self.sessions.pop(session.sock.fileno(), None)
        self._waiting_read.discard(session)
        self._unread.discard(session)
        if session.parked:
            for channel in self.channels.values():
                channel.waiting = [(s, r) for s, r in channel.waiting if s is not session]
        try:
            self._end_attachment(session, recheck_identity=recheck_identity)
        finally:
            self._want(session, 0)
            session.peer.close()
            session.outbox.clear()
            charges = [c for c in (session.charge, session.reply_charge, session.attachment_charge) if c is not None]
            if session.reply_charge is not None and _unread(session.sock):
                # The peer keeps unread fds of ours and its end open: they stay
                # in flight (and charged) until it reads them or closes.
                self._lingering.append((session.sock, charges))
            else:
                session.sock.close()
                for charge in charges:
                    charge.release()

    # -- requests ------------------------------------------------------------
    def _handle(self, session: Session, event: m.Message) -> None:
        if isinstance(event, m.Hello):
            self._reply(session, m.Welcome(version=m.PROTOCOL_VERSION, broker_pid=os.getpid()))
        elif isinstance(event, m.Attach):
            self._attach(session, event)
        elif isinstance(event, m.Detach):
            reason = self._end_attachment(session, recheck_identity=True)
            self._reply(session, m.Detached())
            session.close_after_flush = True
            if reason:
                log.info("pid %d detached after an identity change", session.peer.identity.pid)
        elif isinstance(event, m.StatusRequest):
            if not self.policy.may_query_status(session.peer.identity):
                raise PermissionDenied(
                    f"permission denied: uid {session.uid} may not query status ({self.policy.status.describe()})"
                )
            self._reply(session, m.StatusReply(status=self.status()))
        elif isinstance(event, m.Cursors):
            self._cursor_pages(session)
        else:  # pragma: no cover - the connection only surfaces requests
            raise ProtocolError(f"unexpected {event.TYPE}")

    # -- attachments -------------------------------------------------------
    def _attach(self, session: Session, request: m.Attach) -> None:
        identity = session.peer.identity
        self.policy.authorize_attach(identity, request.channel, request.role)
        if request.role == "consumer":
            self._check_read_only_holds(identity, request.channel)
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
        if channel.segment is None:
            self._new_segment(channel, session)
        assert channel.segment is not None
        if not channel.segment.ready:
            # Its pages are still being reserved (a step per round): answer
            # when they are, meanwhile read nothing more from this peer.
            session.parked = True
            channel.waiting.append((session, request))
            return
        self._finish_attach(session, request, channel)

    def _check_read_only_holds(self, identity: Identity, channel: str) -> None:
        """Refuse a read-only consumer that could make its fds writable.

        The segment and the ring's pages are owned by the broker's euid (the
        fsuid that created them).  Mode 0 stops everyone else, but their
        owner may fchmod its read-only fd and reopen /proc/self/fd/N
        read-write: for a consumer of the broker's own uid, read-only would
        be a promise the kernel does not keep.  Root is exempt (root can do
        anything anyway); so is a peer the policy also lets produce on the
        channel, for which read-only is no boundary.  A broker running as a
        user of its own (the shipped units' `shmbroker`) never meets this."""
        owner = self._euid
        if identity.uid != owner or owner == 0 or self.policy.permits(identity, channel, "producer"):
            return
        self._peer_event(
            EventKind.PEER_REJECTED,
            f"uid {identity.uid} asked to consume {channel!r} read-only, but it is the broker's own uid",
            pid=identity.pid, uid=identity.uid, channel=channel,
        )
        raise PermissionDenied(
            f"permission denied: uid {identity.uid} is the broker's own uid, so it owns every segment the broker "
            f"creates and could make a read-only one writable (fchmod, then reopen /proc/self/fd); its "
            f"consumer-only rule for {channel!r} cannot be enforced.  Run the broker as a user of its own "
            "(the shipped units use `shmbroker`) or this consumer as another uid"
        )

    def _finish_attach(self, session: Session, request: m.Attach, channel: Channel) -> None:
        identity = session.peer.identity
        segment, ring = channel.segment, channel.ring
        assert segment is not None
        consumer = request.role == "consumer"
        nfds = 1 + (0 if ring is None else len(CONSUMER_FD_NAMES if consumer else producer_fd_names()))
        charge = self._charge_reply(session, nfds)
        attachment_charge: Charge | None = None
        try:
            if ring is not None and consumer:
                attachment_charge = self.ledger.charge(session.uid, fds=1)  # its cursor page
            # Consumers of memfd channels get the read-only fd (see Segment):
            # they cannot change the payload.  Ring consumers write only to the
            # ring's control page and their own cursor page, memfds of their own
            # (_ring/broker.py).
            read_only = consumer and segment.readonly_fd >= 0
            fds, fd_names, slot = [segment.readonly_fd if read_only else segment.fd], ("segment",), None
            if ring is not None:
                if not consumer:
                    other = ring.producer
                    describe = f"pid {other.peer.identity.pid}" if isinstance(other, Session) else "another peer"
                    ring_fds, ring_names = ring.attach_producer(session, channel.name, describe)
                else:
                    slot, ring_fds, ring_names = ring.attach_consumer(session, channel.name)
                fds, fd_names = fds + ring_fds, fd_names + ring_names
        except BaseException:
            charge.release()
            if attachment_charge is not None:
                attachment_charge.release()
            if not channel.sessions and not channel.waiting:  # a segment made for this refused attach: wipe it now
                self._release_segment(channel)
            raise
        channel.sessions.add(session)
        session.channel, session.segment, session.role, session.ring = channel, segment, request.role, ring
        session.attachment_charge = attachment_charge
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
        try:
            self._reply(session, reply, fds, charge)
        except BaseException:
            self._end_attachment(session, recheck_identity=False)
            raise

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
        charge = self._charge_reply(session, len(fds)) if fds else None
        self._reply(session, m.CursorPages(slots=tuple(slots), serials=tuple(serials)), fds, charge)

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
        max_message = None
        if request.ring:
            try:
                max_message = resolve_max_message(request.size, request.max_message)
            except ValueError as exc:
                raise LimitExceeded(f"cannot create ring channel {request.channel!r}: {exc}") from None
        elif request.max_message is not None:
            raise LimitExceeded("max_message applies to ring channels only; pass ring=True")
        spec = ChannelSpec(name=request.channel, size=request.size, ring=request.ring, max_message=max_message)
        channel = Channel(spec, configured=False)
        self.channels[channel.name] = channel
        log.info("uid %d created channel %r (%d bytes)", identity.uid, channel.name, request.size)
        return channel

    def _new_segment(self, channel: Channel, session: Session) -> Segment:
        """A segment for ``channel``, charged to the uid whose attach makes it.

        On-demand channels also count against that uid's segment and byte
        quotas; configured ones are the operator's, so only their fds do."""
        spec = channel.spec
        amounts = {"fds": (2 if spec.backend == "memfd" else 1) + (RING_FDS if spec.ring else 0)}
        if not channel.configured:
            amounts.update(segments=1, bytes=spec.size)
        try:
            charge = self.ledger.charge(session.uid, **amounts)
        except LimitExceeded:
            self._forget_unused(channel)
            raise
        try:
            segment = Segment.create(
                spec.size, channel.generation + 1, backend=spec.backend,
                flags=FLAG_RING if spec.ring else 0,
                on_lease_failure=lambda: self.events.count("lease_failures"),
            )
            try:
                if spec.ring:
                    assert spec.max_message is not None
                    channel.ring = RingState(spec.size, spec.max_message)
                # The first step at once: most segments need no more.
                segment.reserve()
            except BaseException:
                if channel.ring is not None:
                    channel.ring.close()
                    channel.ring = None
                segment.close()
                raise
        except OSError as exc:
            charge.release()
            self._forget_unused(channel)
            raise LimitExceeded(_no_room(channel, exc)) from None
        except BaseException:
            charge.release()
            self._forget_unused(channel)
            raise
        self._segment_charges[segment] = charge
        channel.generation = segment.generation
        channel.segment = segment
        self.events.count("segments_created")
        if not segment.ready:
            self.scheduler.add(charge.uid, lambda: self._reserve_step(channel, segment))
        return segment

    def _reserve_step(self, channel: Channel, segment: Segment) -> bool:
        if channel.segment is not segment:
            return False  # revoked meanwhile; _revoke told the waiters
        try:
            if not segment.reserve():
                return True
        except OSError as exc:
            self._segment_failed(channel, segment, exc)
            return False
        # One waiter at a time off the list, so a waiter whose attach fails
        # does not release the segment under the ones still waiting.
        while channel.waiting and channel.segment is segment:
            session, request = channel.waiting.pop(0)
            session.parked = False
            if session.closed:
                continue
            self._run_request(session, request)
            if session.outbox:
                self._flush(session)
            self._settle(session)
        if channel.segment is segment and not channel.sessions and not channel.waiting:
            self._release_segment(channel)
        return False

    def _segment_failed(self, channel: Channel, segment: Segment, exc: OSError) -> None:
        """Reserving the pages failed (/dev/shm or memory full): refuse every waiter, keep serving."""
        log.warning("could not reserve the pages of channel %r: %s", channel.name, exc.strerror or exc)
        channel.segment = None
        self._close_ring(channel)
        segment.begin_wipe(free=True)  # never handed out; frees what was reserved
        self._dispose(segment)
        self._fail_waiters(channel, LimitExceeded(_no_room(channel, exc)))
        self._forget_unused(channel)

    def _fail_waiters(self, channel: Channel, error: ShmBrokerError) -> None:
        waiting, channel.waiting = channel.waiting, []
        for session, _ in waiting:
            session.parked = False
            if session.closed:
                continue
            self._reply_error(session, m.Error(_ERROR_CODES.get(type(error), "internal"), str(error)))
            if session.outbox:
                self._flush(session)
            self._settle(session)

    def _end_attachment(self, session: Session, *, recheck_identity: bool) -> str | None:
        channel, segment = session.channel, session.segment
        if channel is None:
            return None
        session.channel = session.segment = None
        channel.sessions.discard(session)
        channel.revoked_sessions.discard(session)
        if session.ring is not None:
            session.ring.detach(session)  # frees a consumer slot so it cannot stall the producer
            session.ring = None
        if session.attachment_charge is not None:
            session.attachment_charge.release()
            session.attachment_charge = None
        self.events.count("detaches")
        reason = None
        if recheck_identity:
            try:
                reason = recheck(session.peer)
            except Exception as exc:  # fail closed: what cannot be re-verified counts as changed
                reason = f"pid {session.peer.identity.pid} could not be re-verified ({type(exc).__name__}: {exc})"
        identity = session.peer.identity
        if reason is not None:
            self._peer_event(EventKind.IDENTITY_CHANGED, reason, pid=identity.pid, uid=identity.uid, channel=channel.name)
            if segment is not None and segment is channel.segment:
                self._revoke(channel)
        log.info("detached pid %d from channel %r", identity.pid, channel.name)
        if not channel.sessions and not channel.waiting:
            self._release_segment(channel)
        elif session.role == "producer" and segment is channel.segment:
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

    def _revoke(self, channel: Channel, *, at_once: bool = False) -> None:
        """Wipe the channel's segment for everyone attached and stop handing it out.

        The revoked word is set at once; wiping the rest is segment work done
        in steps (at once at shutdown and on panic).  The segment, and a
        posix segment's lease, is released only when the wipe is complete: an
        opener blocked by the lease break sees nothing but zeros."""
        segment = channel.segment
        if segment is None:
            return
        channel.segment = None
        # Peers still attached may read their mapping: overwrite, so their
        # reads need no new page; nobody attached: free the pages.
        problem = segment.begin_wipe(free=not (channel.sessions and segment.ready))
        # They stay connected, but no longer hold the channel: the next
        # segment's last detach and wipe_when count only its own peers.
        channel.revoked_sessions |= channel.sessions
        channel.sessions = set()
        if problem is not None:
            self.events.record(
                EventKind.WIPE_FAILED, f"segment of channel {channel.name!r} (generation {segment.generation}): {problem}",
                channel=channel.name,
            )
        self._close_ring(channel)
        if channel.waiting:
            self._fail_waiters(channel, ChannelRevoked(
                f"channel {channel.name!r} was revoked before its segment was ready; attach again"
            ))
        if segment.ready:
            self.events.count("segments_wiped")
        self._dispose(segment, at_once=at_once)

    def _dispose(self, segment: Segment, *, at_once: bool = False) -> None:
        """Finish the wipe begun on ``segment`` in steps charged to its creator, then close it."""
        charge = self._segment_charges.get(segment)
        if at_once or charge is None or segment.length <= STEP_BYTES:
            segment.wipe()
            self._close_segment(segment)
            return
        self._wiping[segment] = charge
        self.scheduler.add(charge.uid, lambda: self._wipe_step(segment))

    def _wipe_step(self, segment: Segment) -> bool:
        if segment not in self._wiping:
            return False  # finished at once meanwhile (panic, shutdown)
        if not segment.wipe_step():
            return True
        del self._wiping[segment]
        self._close_segment(segment)
        return False

    def _finish_wipes(self) -> None:
        for segment in list(self._wiping):
            del self._wiping[segment]
            segment.wipe()
            self._close_segment(segment)

    def _close_segment(self, segment: Segment) -> None:
        segment.close()
        charge = self._segment_charges.pop(segment, None)
        if charge is not None:
            charge.release()

    def _close_ring(self, channel: Channel) -> None:
        """After a wipe: wake every sleeping peer so it sees the revoked word, close the eventfds."""
        if channel.ring is not None:
            channel.ring.close()
            channel.ring = None

    def _release_segment(self, channel: Channel, *, at_once: bool = False) -> None:
        """Nobody is attached any more: zeroize and free the memory."""
        if channel.segment is not None:
            self._revoke(channel, at_once=at_once)
        self._forget_unused(channel)

    def _forget_unused(self, channel: Channel) -> None:
        """An on-demand channel with no segment and nobody attached or waiting disappears."""
        if channel.configured or channel.sessions or channel.waiting or channel.segment is not None:
            return
        if self.channels.get(channel.name) is channel:
            del self.channels[channel.name]

    # -- intrusions and panic ------------------------------------------------
    def _check_leases(self) -> None:
        for channel in list(self.channels.values()):
            segment = channel.segment
            if segment is None:
                continue
            if segment.truncated():
                # A peer ftruncate()d an unsealable (posix) segment.  The wipe
                # restores the size, so peers that have not touched the
                # mapping yet see a revoked segment instead of SIGBUS.
                kind, detail = EventKind.SEGMENT_TRUNCATED, (
                    "was truncated by a peer holding it; size restored, wiped and revoked "
                    '(use backend = "memfd" to seal it)'
                )
            elif not segment.lease_intact():
                # Someone open()ed the unlinked object (root through
                # /proc/PID/fd/N).  _revoke wipes before it releases the lease:
                # the opener's open() is blocked until then, so it sees zeros.
                kind, detail = EventKind.LEASE_BROKEN, "was opened or truncated by another process; wiped and revoked"
            else:
                continue
            self.events.record(
                kind, f"segment of channel {channel.name!r} (generation {segment.generation}) {detail}",
                channel=channel.name,
            )
            self._revoke(channel)

    def panic(self) -> None:
        """SIGUSR1: wipe and revoke every segment at once, and finish every wipe in progress."""
        wiped = 0
        for channel in list(self.channels.values()):
            if channel.segment is not None:
                self._revoke(channel, at_once=True)
                wiped += 1
        self._finish_wipes()
        self.events.record(EventKind.PANIC_WIPE, f"panic signal: wiped and revoked {wiped} segment(s)")

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
                    "revoked": s in channel.revoked_sessions,
                    "attached_at": s.attached_at,
                }
                for s in sorted(channel.sessions | channel.revoked_sessions, key=lambda s: s.attached_at or 0)
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
                "fds_charged": self.ledger.total_used(Resource.FDS),
                "fd_budget": self.ledger.total.get(Resource.FDS),
            },
            "channels": channels,
            "connections": len(self.sessions),
            "counters": dict(sorted(self.events.counters.items())),
            "security_events": [e.as_dict() for e in self.events.events],
            "confinement": confinement.report(),
        }


def _no_room(channel: Channel, exc: OSError) -> str:
    where = "memory" if channel.spec.backend == "memfd" else "/dev/shm (or memory)"
    return (
        f"could not reserve {channel.spec.size} bytes for channel {channel.name!r}: {exc.strerror or exc}; "
        f"{where} is full, try again later or use a smaller size"
    )


def _hung_up(sock: socket.socket) -> bool:
    """The peer closed its end (POLLHUP): whatever it sent, it can read no answer."""
    poller = select.poll()
    poller.register(sock, select.POLLHUP)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


def _unread(sock: socket.socket) -> int:
    try:
        return unread_bytes(sock)
    except OSError:
        return 0


def _fd_budget(max_connections: int, max_fds_per_uid: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards FD_TARGET and return how many fds
    peers may be charged for: the limit minus what is open now and a spare."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < FD_TARGET:
        new_soft = FD_TARGET if hard == resource.RLIM_INFINITY else min(FD_TARGET, hard)
        if new_soft > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
                soft = new_soft
            except (ValueError, OSError):
                pass
    if soft == resource.RLIM_INFINITY:
        soft = FD_TARGET
    budget = soft - len(os.listdir("/proc/self/fd")) - FD_SPARE
    wanted = max_connections * SESSION_FDS + max_fds_per_uid
    if budget < wanted:
        log.warning(
            "RLIMIT_NOFILE is %d: peers may be charged %d fds in total, fewer than max_connections needs (about %d); "
            "raise the hard limit (e.g. LimitNOFILE= in the unit) or lower max_connections", soft, budget, wanted,
        )
    return max(budget, 0)


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
