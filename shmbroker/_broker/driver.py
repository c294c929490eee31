"""The broker's I/O: the selector loop around the sans-IO core (core.py).

The driver owns every socket and everything that waits: the listener and
accept(), peer verification (a :class:`~.auth.Verifier` it is given), reading
and decoding requests, the one send path (outbox.py), the per-uid fair
scheduler (scheduler.py), signals, deadlines and the sd_notify pings.  It
holds no policy: it tells the core what happened and carries out the
actions the core returns.

Single-threaded on purpose: every state change happens here, signals arrive
through ``signal.set_wakeup_fd`` and are handled between events (never inside
a signal handler), and deadlines are checked by the loop, not by alarms.

Work per peer is bounded and shared fairly (docs/attacks.md, A7 and A8):

* accept() and SO_PEERCRED are all a connection costs until its uid's turn:
  verifying it, each of its requests and each step of the segment work it
  causes are tasks queued under its uid, and every uid with work gets one
  time quantum per loop round;
* a session has at most one request in flight end to end: the next one is
  not read from its buffer until the reply to the last one is written, and,
  if that reply carried fds, read by the peer (SIOCOUTQ); a session with
  input waiting is not read from at all, so the kernel's socket buffer, not
  ours, holds what a pipelining peer sends;
* the fds of a reply stay charged to the peer's uid until it has read them,
  and the total the core may charge leaves the broker its own reserve, so
  floods meet ``LimitExceeded`` and never EMFILE; should EMFILE come from
  outside anyway, a reserve fd lets the loop shed connections instead of
  spinning on them.
"""

from __future__ import annotations

import collections
import dataclasses
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
from .._escape import quote
from .._sys import eventfd, fdpass
from .._sys.peercred import peer_credentials, peer_groups
from .._sys.sdnotify import Notifier
from .._sys.sockqueue import unread_bytes
from .._wire import messages as m
from .._wire.connection import CLOSED, NEED_DATA, PAUSED, Connection, Side
from ..errors import LimitExceeded, ProtocolError
from . import auth, confinement
from .auth import AuthError, Verifier
from .inspector import REPLY_TIMEOUT, InspectorError
from .config import BrokerConfig, check_broker_user
from .core import SESSION_FDS, Action, BrokerCore, Close, Fail, Member, Recheck, Schedule, Send, error_reply
from .listener import LISTEN_BACKLOG, Listener
from .outbox import Outbox, duplicate
from .quota import Charge, Resource
from .scheduler import FairScheduler

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
# A peer that sent its next request before reading the fds of our last
# reply is asked again (SIOCOUTQ) after these delays, doubling: quick for a
# peer that reads a moment later, cheap for one that never does.
UNREAD_RECHECK_MIN = 0.002
UNREAD_RECHECK_MAX = TICK_SECONDS
# Questions to the exe inspector in flight at once: its socket's queue holds
# far more, and a verification beyond this waits for its uid's next turn.
MAX_QUESTIONS = 64


class Unverified:
    """An accepted connection waiting for its uid's turn to be verified, or
    for the exe inspector's answer; nothing is read from it."""

    __slots__ = ("sock", "pid", "uid", "gid", "groups", "charge", "deadline", "closed", "probe")

    def __init__(
        self, sock: socket.socket, credentials: tuple[int, int, int], groups: tuple[int, ...], charge: Charge,
        deadline: float,
    ) -> None:
        self.sock = sock
        self.pid, self.uid, self.gid = credentials
        self.groups = groups  # SO_PEERGROUPS, read once at accept
        self.charge = charge
        self.deadline = deadline
        self.closed = False
        self.probe: auth.Probe | None = None  # pinned, its exe stat asked for

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()
            self.charge.release()
            if self.probe is not None:
                self.probe.abandon()


class Session:
    """The driver's side of one verified connection: its socket, wire state and queues."""

    def __init__(self, sock: socket.socket, member: Member, conn: Connection) -> None:
        self.sock = sock
        self.member = member
        self.conn = conn
        self.outbox = Outbox()
        # fds of the last reply that carried some, until the peer has read
        # them: in flight they are charged to the broker's user by the kernel.
        self.reply_charge: Charge | None = None
        self.input = False  # bytes were read that may hold a request (or the end)
        self.queued = False  # a task of this session is in the scheduler
        self.close_after_flush = False
        self.interest = 0  # selector events registered for the socket
        self.closed = False
        self.recheck_at = 0.0  # when to ask again whether the peer read our fds
        self.recheck_delay = 0.0
        self.verifying = False  # its held request's answer waits on a fresh exe check
        # Held (wait=) and it sent more: left unread in its own socket buffer,
        # and polled for a hang-up each tick instead.
        self.quiet = False

    @property
    def uid(self) -> int:
        return self.member.uid

    @property
    def pid(self) -> int:
        return self.member.identity.pid


class Broker:
    def __init__(
        self,
        config: BrokerConfig,
        socket_path: str,
        *,
        listen_socket: socket.socket | None = None,
        on_ready: Callable[[Broker], None] | None = None,
        notifier: Notifier | None = None,
        verifier: Verifier | None = None,
    ) -> None:
        check_broker_user(config)
        self.config = config
        self.limits = config.limits
        self.listener = Listener(socket_path, config.socket_group)
        self.verifier = verifier or Verifier()
        self._adopted = listen_socket
        self._on_ready = on_ready
        self.notifier = notifier or Notifier(None, None)
        self.started = time.time()
        self.core = BrokerCore(
            config, euid=os.geteuid(), broker_info=self._info,
            status_extra=lambda: {"confinement": confinement.report()},
        )
        self.sessions: dict[int, Session] = {}
        self._by_member: dict[Member, Session] = {}
        self._unverified: set[Unverified] = set()
        self.selector = selectors.DefaultSelector()
        self.scheduler = FairScheduler()
        # Sessions whose next request waits until the peer read our last fds.
        self._waiting_read: set[Session] = set()
        # Sessions holding a reply charge (checked each tick, so idle peers give it back).
        self._unread: set[Session] = set()
        # Sockets of closed sessions whose peer still has not read fds we sent
        # (and keeps its end open): the fds stay in flight, so the charge stays.
        self._lingering: list[tuple[socket.socket, list[Charge]]] = []
        self._running = False
        self._started = False  # set once listening: only then is there a stop to report
        self._wakeup_r = -1
        self._wakeup_w = -1
        self._old_wakeup = -1
        self._old_handlers: dict[int, Any] = {}
        self._reserve_fd = -1
        self._listening = False
        self._next_sweep = 0.0  # monotonic time of the next lease/truncation check
        # Questions to the exe inspector still unanswered: request number ->
        # what to do with the answer.  The loop serves others meanwhile.
        # Each with when it was asked: the inspector answers in order, so the
        # first one is the oldest (see _expire_questions).
        self._asked: dict[int, tuple[float, Callable[[auth.StatResult], None]]] = {}
        self._awaiting_inspector: collections.deque[Unverified] = collections.deque()
        self._inspector_fd = -1
        # Members that left but whose re-check is still out: their pidfd stays open until it is in.
        self._rechecking: set[Member] = set()
        # Sessions with replies queued in this turn, written at its end.
        self._pending_flush: set[Session] = set()
        self._quiet: set[Session] = set()  # held sessions not read, polled for a hang-up

    @property
    def events(self) -> Any:
        return self.core.events

    def _info(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uid": os.getuid(),
            "socket": self.listener.path,
            "started": self.started,
            "policy": self.config.source or "default",
        }

    def status(self) -> dict[str, Any]:
        return self.core.status()

    # -- lifecycle ---------------------------------------------------------
    def run(self) -> None:
        """Serve until SIGTERM/SIGINT; always wipes segments and removes the socket."""
        try:
            self._setup()
            self._started = True
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
        self.core.ledger.total[Resource.FDS] = _fd_budget(self.limits.max_connections, self.limits.fds_per_uid)
        log.info(
            "broker %s listening on %s (pid %d, uid %d, policy %s)",
            __version__, self.listener.path, os.getpid(), os.getuid(), self.config.source or "default",
        )

    def _teardown(self) -> None:
        """Wipe everything and close everything, whatever fails on the way."""
        steps: list[Callable[[], None]] = [
            *(lambda s=s: self._close_session(s, recheck_identity=False) for s in list(self.sessions.values())),
            *(pending.close for pending in list(self._unverified)),
            self.core.shutdown,
            self._close_lingering,  # after the sessions: closing them may add some
            self._forget_questions,
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
        if self._started:
            log.info("broker stopped; every segment was wiped")

    def _forget_questions(self) -> None:
        """Shutting down: the inspector's late answers no longer matter."""
        self._asked.clear()
        for member in self._rechecking:
            member.peer.close()
        self._rechecking.clear()

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
            deadlines = [p.deadline for p in self._unverified]
            deadlines += [s.recheck_at for s in self._waiting_read]
            handshake = self.core.next_deadline()
            if handshake is not None:
                deadlines.append(handshake)
            ping = self.notifier.seconds_until_ping(now)
            timeout = min([self._next_sweep - now, *(d - now for d in deadlines), *([ping] if ping is not None else [])])
        for key, mask in self.selector.select(max(timeout, 0.0)):
            key.data(key, mask)
        self._flush_pending()
        self.scheduler.run_round()
        self._flush_pending()
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
        self._apply(self.core.check_segments())
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
        for session in [s for s in self._quiet if _hung_up(s.sock)]:
            self._close_session(session, recheck_identity=True)  # gave up waiting
        self.core.refusal_summaries(now)
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

    def panic(self) -> None:
        """SIGUSR1: wipe and revoke every segment at once."""
        self._apply(self.core.panic())

    def _expire_deadlines(self, now: float) -> None:
        self._expire_questions(now)
        for pending in [p for p in self._unverified if p.deadline <= now]:
            self.core.events.count("handshake_timeouts")
            self._unverified.discard(pending)
            pending.close()
        self._apply(self.core.expired(now))

    # -- accepting -----------------------------------------------------------
    def _on_accept(self, key: selectors.SelectorKey, mask: int) -> None:
        listener: socket.socket = key.fileobj  # type: ignore[assignment]
        for _ in range(ACCEPT_BURST):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.core.events.count("accept_errors")
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._shed(listener, exc)
                else:
                    log.error("accept failed: %s", exc.strerror)
                return
            self.core.events.count("connections_accepted")
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
        self.core.events.count("connections_shed", shed)
        log.error(
            "accept failed (%s): the broker is out of file descriptors; closed %d waiting connection(s)%s",
            exc.strerror, shed, "" if self._listening else ", not accepting until the next tick",
        )

    def _admit(self, sock: socket.socket) -> None:
        if _hung_up(sock):
            # connect, send, close before we even looked: nothing to answer.
            self.core.events.count("hung_up_unverified")
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
        admitted = self.core.admit(pid, uid, gid, groups)
        if not isinstance(admitted, Charge):
            if admitted is None:
                sock.close()
            else:
                self._refuse(sock, admitted)
            return
        pending = Unverified(sock, credentials, groups, admitted, time.monotonic() + self.limits.handshake_timeout)
        self._unverified.add(pending)
        self.scheduler.add(uid, lambda: self._verify(pending), new=True)

    def _verify(self, pending: Unverified) -> bool:
        """The uid's turn: verify the peer before a single byte of it is read."""
        if pending.closed:
            return False
        if len(self._asked) >= MAX_QUESTIONS:
            self._awaiting_inspector.append(pending)  # queued again as answers come in
            return False
        sock = pending.sock
        if _hung_up(sock):
            # Gone before its turn: nothing can reach it any more, so it is
            # not worth a verification (a flood of connect-and-close would
            # otherwise buy one /proc inspection each).
            self.core.events.count("hung_up_unverified")
            self._unverified.discard(pending)
            pending.close()
            return False
        try:
            pending.probe = auth.begin_verify(sock, (pending.pid, pending.uid, pending.gid), pending.groups)
        except Exception as exc:  # fail closed: any error is a rejection
            self._unverified.discard(pending)
            self._reject(pending, exc)
            return False
        probe = pending.probe
        self._ask_exe(probe.pid, lambda stat: self._verified(pending, probe, stat))
        return False

    def _verified(self, pending: Unverified, probe: auth.Probe, stat: auth.StatResult) -> None:
        """The exe stat of a peer being verified is in (the inspector may have taken a while)."""
        if pending.closed:  # its deadline passed meanwhile
            probe.abandon()
            return
        self._unverified.discard(pending)
        pending.probe = None
        sock = pending.sock
        try:
            peer = auth.finish_verify(probe, stat)
        except Exception as exc:  # fail closed: any error is a rejection
            self._reject(pending, exc)
            return
        member, refusal, evicted = self.core.join(peer, pending.charge)
        if member is None:
            peer.close()
            pending.charge.release()
            assert refusal is not None
            self._refuse(sock, refusal)
            return
        conn = Connection(Side.BROKER, max_frame_size=self.limits.max_frame_size, max_pending_frames=self.limits.max_pending_frames)
        session = Session(sock, member, conn)
        self.sessions[sock.fileno()] = session
        self._by_member[member] = session
        self._apply(evicted)
        identity = member.identity
        log.debug(
            "accepted pid %d uid %d exe %s cgroup %s label %s (%s)", identity.pid, identity.uid,
            quote(identity.exe_path), quote(identity.cgroup or ""), quote(identity.label or ""), peer.pidfd_source,
        )
        # Its hello and first request are usually waiting already: read them
        # now rather than after another turn of the loop.
        self._read(session)

    def _requeue(self, pending: Unverified) -> None:
        self.scheduler.add(pending.uid, lambda: self._verify(pending), new=True)

    def _reject(self, pending: Unverified, exc: Exception) -> None:
        if not isinstance(exc, AuthError):
            log.exception("peer verification failed unexpectedly")
            exc = AuthError(f"peer could not be verified ({type(exc).__name__})")
        pending.charge.release()
        self._refuse(pending.sock, self.core.reject(str(exc), pending.pid, pending.uid))

    # -- the exe inspector, asked without waiting --------------------------------
    def _ask_exe(self, pid: int, then: Callable[[auth.StatResult], None]) -> None:
        """Stat pid's executable, here or through the inspector; ``then`` gets the result.

        Without Landlock the stat is done at once.  With it, the question
        goes to the inspector and the loop serves others until the answer
        comes (its fd is in the selector), so a slow or starved inspector
        stalls only the peers it is asked about."""
        inspector = self.verifier.inspector
        if inspector is None:
            then(self.verifier.stat_now(pid))
            return
        try:
            seq = inspector.submit(pid)
        except OSError as exc:
            then(exc)
            return
        if self._inspector_fd != inspector.fileno():
            self.selector.register(inspector.fileno(), selectors.EVENT_READ, self._on_inspector)
            self._inspector_fd = inspector.fileno()
        self._asked[seq] = (time.monotonic(), then)

    def _on_inspector(self, key: selectors.SelectorKey, mask: int) -> None:
        inspector = self.verifier.inspector
        try:
            if inspector is None:
                raise InspectorError(errno.EIO, "exe inspector is gone")
            answers = inspector.collect()
        except OSError as exc:
            # Gone for good: every open question fails (closed: rejections,
            # and re-checks that count as changed).
            log.error("the exe inspector is gone (%s); peers cannot be verified until the broker restarts", exc.strerror)
            self.selector.unregister(key.fileobj)
            self._inspector_fd = -1
            asked, self._asked = self._asked, {}
            for _, then in asked.values():
                then(exc)
            return
        for seq, result in answers:
            answer = self._asked.pop(seq, None)
            if answer is not None:
                answer[1](result)
        self._ask_awaiting()

    def _ask_awaiting(self) -> None:
        while self._awaiting_inspector and len(self._asked) < MAX_QUESTIONS:
            self._requeue(self._awaiting_inspector.popleft())

    def _expire_questions(self, now: float) -> None:
        """Questions the inspector has sat on for REPLY_TIMEOUT fail (a stalled
        but living inspector would otherwise hold them for ever): a peer being
        verified is rejected, a held answer is not sent, and a re-check at
        close counts as changed, so its segment is revoked (fail closed)."""
        stale = []
        for seq, (asked_at, _) in self._asked.items():
            if now - asked_at < REPLY_TIMEOUT:
                break
            stale.append(seq)
        if not stale:
            return
        log.error(
            "the exe inspector did not answer %d question(s) within %gs; treating them as unverifiable",
            len(stale), REPLY_TIMEOUT,
        )
        for seq in stale:
            _, then = self._asked.pop(seq)
            then(InspectorError(errno.ETIMEDOUT, f"the exe inspector did not answer within {REPLY_TIMEOUT:g}s"))
        self._ask_awaiting()

    def _refuse(self, sock: socket.socket, error: m.Error) -> None:
        """Tell a peer we will not serve it, without ever waiting on it."""
        self.core.events.count("connections_refused")
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
        if session.member.wait_until is not None:
            self._peek_held(session)
            return
        try:
            data, fds, flags, sender = fdpass.recv_with_sender(session.sock, RECV_SIZE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            self._settle(session)  # nothing yet: wait for it
            return
        except OSError as exc:
            data, fds, flags, sender = b"", [], 0, None
            if exc.errno != errno.ECONNRESET:
                log.info("read from pid %d failed: %s", session.pid, exc.strerror)
        if data and sender is not None and sender != session.pid:
            fdpass.close_all(fds)
            self._apply(self.core.handed_over(session.member, sender))
            return
        if fds or flags & socket.MSG_CTRUNC:
            fdpass.close_all(fds)
            self.core.events.count("fd_violations")
            violation = ProtocolError(f"clients may not send file descriptors (sent {len(fds)}; closed them)")
            self._apply(self.core.protocol_error(session.member, violation))
            return
        try:
            session.conn.receive_data(data)
        except ProtocolError as exc:
            self._apply(self.core.protocol_error(session.member, exc))
            return
        session.input = True
        self._settle(session)

    def _peek_held(self, session: Session) -> None:
        """A held attach's socket turned readable: a hang-up ends the wait;
        anything else it sends stays in its socket until the answer is out
        (held for up to a day, it must not make the broker buffer it)."""
        try:
            peeked = session.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            peeked = b""
        if not peeked:
            self._close_session(session, recheck_identity=True)  # gave up waiting
            return
        session.quiet = True
        self._quiet.add(session)
        self._settle(session)

    def _settle(self, session: Session) -> None:
        """Register the session for what it waits for, or queue its next request.

        It is read from only when nothing of it waits here: a peer that
        pipelines fills its own socket buffer, not the broker's memory."""
        if session.closed or session in self._pending_flush:
            return  # settled once its replies are written, at the end of this turn
        if session.quiet and session.member.wait_until is None:
            session.quiet = False  # answered: what it sent is read as usual
            self._quiet.discard(session)
        if session.verifying or session.quiet:
            self._want(session, 0)
        elif session.outbox:
            self._want(session, selectors.EVENT_WRITE)
        elif session.member.parked:
            # Held for a channel (wait=): still read, to notice the peer giving
            # up (what else it sends waits in the decoder, which bounds it);
            # held for pages: that takes no time.
            held = session.member.wait_until is not None
            self._want(session, selectors.EVENT_READ if held else 0)
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
        if session.closed or self._blocked(session) or session.member.parked or session.verifying:
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
            self._apply(self.core.protocol_error(session.member, exc))
            return False
        if event is PAUSED:  # its last request is still being answered (parked)
            session.queued = False
            self._settle(session)
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
        self._apply(self.core.request(session.member, event))
        if session.closed or self._blocked(session) or session.member.parked or session.close_after_flush:
            session.queued = False
            self._settle(session)
            return False
        return True

    @staticmethod
    def _blocked(session: Session) -> bool:
        """Its socket is full: nothing more from it until what is queued is written."""
        return session.interest == selectors.EVENT_WRITE

    def _recheck_unread(self, now: float) -> None:
        for session in [s for s in self._waiting_read if s.recheck_at <= now]:
            if self._reply_read(session):
                self._settle(session)
            else:
                session.recheck_delay = min(session.recheck_delay * 2, UNREAD_RECHECK_MAX)
                session.recheck_at = now + session.recheck_delay

    def _reply_read(self, session: Session) -> bool:
        """True (and the reply's fd charge released) once the peer read our last fds."""
        if session.outbox or _unread(session.sock):
            return False
        if session.reply_charge is not None:
            session.reply_charge.release()
            session.reply_charge = None
        self._unread.discard(session)
        self._waiting_read.discard(session)
        return True

    # -- carrying out the core's actions ----------------------------------------
    def _apply(self, actions: list[Action]) -> None:
        touched: list[Session] = []
        for action in actions:
            if isinstance(action, Schedule):
                self.scheduler.add(action.uid, self._work(action))
                continue
            if isinstance(action, Recheck):
                self._recheck(action)
                continue
            session = self._by_member.get(action.member)
            if session is None or session.closed:
                if isinstance(action, Send) and action.charge is not None:
                    action.charge.release()
                continue
            if isinstance(action, Send):
                self._send(session, action)
                touched.append(session)
            elif isinstance(action, Fail):
                self._fail(session, action.error)
            elif isinstance(action, Close):
                session.close_after_flush = True
                touched.append(session)
        # Written when the current turn of work is over (_flush_pending), so
        # the replies to a pipelined hello+attach leave in one write and the
        # client wakes once, not once per reply.
        self._pending_flush.update(touched)

    def _flush_pending(self) -> None:
        while self._pending_flush:
            session = self._pending_flush.pop()
            if session.closed:
                continue
            if session.outbox:
                self._flush(session)
            elif session.close_after_flush:
                self._close_session(session, recheck_identity=False)
            else:
                self._settle(session)

    def _recheck(self, action: Recheck) -> None:
        member = action.member
        self._rechecking.add(member)

        def rechecked(stat: auth.StatResult) -> None:
            try:
                reason = auth.recheck_result(member.peer, stat)
            except Exception as exc:  # fail closed: what cannot be re-verified counts as changed
                reason = f"pid {member.identity.pid} could not be re-verified ({type(exc).__name__}: {exc})"
            self._rechecking.discard(member)
            if member not in self._by_member:  # its connection is closed: its pidfd goes now
                member.peer.close()
            self._apply(self.core.rechecked(action, reason))

        self._ask_exe(member.identity.pid, rechecked)

    def _work(self, action: Schedule) -> Callable[[], bool]:
        def task() -> bool:
            done, actions = action.step()
            self._apply(actions)
            return not done
        return task

    def _send(self, session: Session, action: Send) -> None:
        """Queue a reply with copies of its fds: the broker's only way to
        talk to a session, in order, so no frame is ever written into the
        middle of another."""
        if action.reverify:
            self._reverify_then_send(session, action)
            return
        copies: list[int] = []
        try:
            # Duplicated before the message advances the conversation, so a
            # failure (EMFILE) leaves the connection state as it was.
            copies = duplicate(list(action.fds))
            frame = session.conn.send(action.message)
        except Exception as exc:
            fdpass.close_all(copies)
            if action.charge is not None:
                action.charge.release()
            log.warning("could not queue a %s reply for pid %d: %s", action.message.TYPE, session.pid, exc)
            self._fail(session, error_reply(LimitExceeded(f"the broker could not answer ({exc}); try again later")))
            return
        session.outbox.put_owned(frame, copies)
        if action.charge is not None:
            if session.reply_charge is not None:
                session.reply_charge.release()  # cannot happen: one fd reply is read before the next request
            session.reply_charge = action.charge
            self._unread.add(session)

    def _reverify_then_send(self, session: Session, action: Send) -> None:
        """Send a held request's fds only if the peer still runs what it was
        admitted with: a process that exec()ed another binary since keeps the
        connection, and would otherwise receive them (docs/attacks.md, A2).
        Until the answer is in, nothing more of the session is read."""
        session.verifying = True
        member = session.member

        def checked(stat: auth.StatResult) -> None:
            session.verifying = False
            if session.closed:
                if action.charge is not None:
                    action.charge.release()
                return
            try:
                same, reason = auth.reverify(member.peer, stat)
            except Exception as exc:  # fail closed
                same, reason = False, f"pid {member.identity.pid} could not be re-verified ({type(exc).__name__}: {exc})"
            if not same:
                # Nothing is sent.  No segment is revoked either: the peer got
                # nothing, and its channel's other peers did nothing wrong.
                if action.charge is not None:
                    action.charge.release()
                if reason is not None:  # None: it exited meanwhile
                    self.core.changed_before_answer(member, reason)
                self._close_session(session, recheck_identity=False)
                return
            self._send(session, dataclasses.replace(action, reverify=False))
            self._pending_flush.add(session)

        self._ask_exe(member.identity.pid, checked)

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
        if session.closed:
            return
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
        self._pending_flush.discard(session)
        self.sessions.pop(session.sock.fileno(), None)
        self._by_member.pop(session.member, None)
        self._waiting_read.discard(session)
        self._unread.discard(session)
        self._quiet.discard(session)
        try:
            self._apply(self.core.leave(session.member, recheck_identity=recheck_identity))
        finally:
            self._want(session, 0)
            if session.member not in self._rechecking:
                session.member.peer.close()
            session.outbox.clear()
            charges = [c for c in (session.member.charge, session.reply_charge) if c is not None]
            if session.reply_charge is not None and _unread(session.sock):
                # The peer keeps unread fds of ours and its end open: they stay
                # in flight (and charged) until it reads them or closes.
                self._lingering.append((session.sock, charges))
            else:
                session.sock.close()
                for charge in charges:
                    charge.release()


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


def _fd_budget(max_connections: int, fds_per_uid: int) -> int:
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
    wanted = max_connections * SESSION_FDS + fds_per_uid
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
