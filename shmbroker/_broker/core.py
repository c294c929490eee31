"""The broker's decisions, without I/O on sockets: channels, admission,
attach, detach, revocation, quotas and status.

In the spirit of h11 and of dbus-broker's ``bus/`` against its main loop:
the driver (driver.py) owns the sockets, the selector, signals and the send
path; it tells the core what happened (a peer connected, a request arrived, a
peer hung up, a tick) and carries out the actions the core returns (send this
reply with these fds, fail this member, close it, schedule this segment
work).  The core never reads or writes a socket, never sleeps and takes its
clocks as arguments, so every decision is testable in-process
(tests/test_broker_core.py).  It does own the kernel objects behind a
channel (segments, ring pages), whose lifecycle *is* the decision.

Everything a member holds is charged to its uid (quota.py) and released with
it; events a peer causes are rate-limited per uid (ratelimit.py).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from .._escape import quote
from .._layout import FLAG_RING, LAYOUT_VERSION
from .._ring import layout as ring_layout
from .._ring.broker import RingState
from .._ring.layout import CONSUMER_FD_NAMES, producer_fd_names
from .._ring.layout import resolve_max_message
from .._wire import messages as m
from ..errors import (
    ChannelBusy,
    ChannelNotFound,
    ChannelRevoked,
    LimitExceeded,
    PermissionDenied,
    ProtocolError,
    ShmBrokerError,
    Timeout,
)
from .auth import VerifiedPeer
from .config import BrokerConfig, ChannelSpec
from .events import EventKind, EventLog, Who
from .policy import Identity
from .quota import Charge, Ledger, Resource
from .ratelimit import RateLimiter
from .segments import STEP_BYTES, Segment

log = logging.getLogger(__name__)

# fds the broker itself holds for a segment beyond the segment's own: a
# ring's control and index pages, the index page's read-only twin, and the
# producer's and every consumer slot's eventfd (_ring/broker.py).
RING_FDS = 4 + ring_layout.MAX_CONSUMERS
# A member's own fds, held by the driver: its socket and the pidfd pinning its peer.
SESSION_FDS = 2
# Peers a truncation event names per uid that held the segment writable.
# The uid is what the event is charged to; the pids only help the operator,
# so a uid attaching from ever new processes cannot grow the list.
WRITERS_KEPT_PER_UID = 4



def error_reply(exc: ShmBrokerError) -> m.Error:
    return m.Error(exc.code.value, str(exc))


class Member:
    """One verified peer's standing with the broker: who it is and what it holds."""

    def __init__(self, peer: VerifiedPeer, charge: Charge, accepted_at: float) -> None:
        self.peer = peer
        self.charge = charge  # the connection, its socket and pidfd
        self.accepted_at = accepted_at  # monotonic; the handshake deadline counts from here
        self.channel: Channel | None = None
        self.segment: Segment | None = None  # the one it attached to (its channel's may be newer)
        self.ring: RingState | None = None
        self.role: str | None = None
        self.attached_at: float | None = None  # wall clock, for status
        self.attachment_charge: Charge | None = None  # a ring consumer's cursor page
        self.parked = False  # its attach waits: for the segment's pages, or (wait=) for the channel
        self.wait_until: float | None = None  # monotonic deadline of an attach(wait=) held for its channel

    @property
    def identity(self) -> Identity:
        return self.peer.identity

    @property
    def uid(self) -> int:
        return self.peer.identity.uid

    @property
    def attached(self) -> bool:
        return self.channel is not None

    def who(self, *, channel: str | None = None, role: str | None = None, rule: int | None = None) -> Who:
        identity = self.identity
        return Who(
            pid=identity.pid, uid=identity.uid, gid=identity.gid, exe=identity.exe_path,
            channel=channel or (self.channel.name if self.channel else None), role=role or self.role, rule=rule,
        )


class Channel:
    """A named channel; it holds a segment only while someone is attached."""

    def __init__(self, spec: ChannelSpec, *, configured: bool) -> None:
        self.spec = spec
        self.configured = configured
        self.segment: Segment | None = None
        self.ring: RingState | None = None  # with the segment, for ring channels
        self.generation = 0
        # Members attached to the current segment: what decides when it is
        # wiped (last detach, wipe_when).  Members still connected to a
        # segment revoked since are only remembered, for status.
        self.members: set[Member] = set()
        self.revoked_members: set[Member] = set()
        # Attach requests waiting for the segment's pages to be reserved.
        self.waiting: list[tuple[Member, m.Attach]] = []
        # Everyone handed a read-write fd of the current segment, by uid: who
        # can have truncated it.  Kept after they detach, since the fd stays
        # theirs; reset with each new segment.
        self.writers: dict[int, list[Who]] = {}

    @property
    def name(self) -> str:
        return self.spec.name

    def add_writer(self, uid: int, who: Who) -> None:
        kept = [w for w in self.writers.get(uid, []) if w.pid != who.pid]
        self.writers[uid] = [*kept, who][-WRITERS_KEPT_PER_UID:]


# -- actions: what the driver is to do --------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Send:
    """Queue ``message`` to the member, with copies of ``fds``; ``charge`` is
    their quota charge, to release once the peer has read them."""

    member: Member
    message: m.Message
    fds: tuple[int, ...] = ()
    charge: Charge | None = None
    # The answer to a request held since an earlier turn (attach wait=, or
    # a new segment's pages): the peer may have exec()ed another binary on
    # the connection meanwhile, so it is checked again before the fds go out.
    reverify: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class Fail:
    """Send ``error`` if the connection takes it now, then close; never wait on the peer."""

    member: Member
    error: m.Error


@dataclasses.dataclass(frozen=True, eq=False)
class Close:
    """Close once what is queued for the member is written (after a detach)."""

    member: Member


# A step of segment work: (finished, actions to carry out now).
Step = Callable[[], tuple[bool, "list[Action]"]]


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """Run ``step`` under ``uid``'s share of the broker (scheduler.py) until it says it is finished."""

    uid: int
    step: Step


@dataclasses.dataclass(frozen=True, eq=False)
class Recheck:
    """Re-verify the executable of a member that has left (its pidfd still
    open) and report to :meth:`BrokerCore.rechecked`, with what it held."""

    member: Member
    channel: Channel
    segment: Segment | None


Action = Send | Fail | Close | Schedule | Recheck


class BrokerCore:
    def __init__(
        self,
        config: BrokerConfig,
        *,
        euid: int,
        broker_info: Callable[[], dict[str, Any]] = dict,
        status_extra: Callable[[], dict[str, Any]] = dict,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.policy = config.policy
        self.limits = limits = config.limits
        self.euid = euid  # owns every segment and page this broker creates
        self._broker_info = broker_info
        self._status_extra = status_extra  # what the driver knows of the process (its confinement)
        self._clock = clock
        self._wall_clock = wall_clock
        self.events = EventLog()
        self.channels: dict[str, Channel] = {
            name: Channel(spec, configured=True) for name, spec in config.channels.items()
        }
        self.members: set[Member] = set()
        self.ledger = Ledger(
            per_uid={
                Resource.CONNECTIONS: limits.max_connections_per_uid,
                Resource.SEGMENTS: limits.max_segments_per_uid,
                Resource.BYTES: limits.max_bytes_per_uid,
                Resource.FDS: limits.fds_per_uid,
            },
            total={Resource.CONNECTIONS: limits.max_connections},  # FDS: set by the driver from its rlimit
        )
        self.refusals = RateLimiter(limits.refusals_per_uid_burst, limits.refusal_window)
        # identity_changed has a burst of its own: refusals, which cost a
        # peer nothing, must not use it up and so hide an exec that follows.
        self.identity_events = RateLimiter(limits.refusals_per_uid_burst, limits.refusal_window)
        # attach(wait=) requests held until their channel exists (and a ring
        # consumer's has a producer): channel name -> [(member, request)].
        self.awaiting: dict[str, list[tuple[Member, m.Attach]]] = {}
        # Segments being wiped in steps, with the charge of their creator.
        self._wiping: dict[Segment, Charge] = {}
        self._segment_charges: dict[Segment, Charge] = {}

    # -- admission -------------------------------------------------------------
    def admit(self, pid: int, uid: int, gid: int, groups: tuple[int, ...]) -> Charge | m.Error | None:
        """A connection, before the costly check of its executable: its charge
        if it may go on to be verified, an error to answer it with, or None
        to close it unanswered (a uid no rule names, past its burst)."""
        try:
            self.policy.check_connect(uid, gid, groups)
        except PermissionDenied as exc:
            now = self._clock()
            if self.refusals.limited(uid, now):
                self.refusals.note_dropped(uid, now)
                self.events.count("connections_dropped")
                return None
            return self.reject(str(exc), pid, uid)
        try:
            return self.ledger.charge(uid, connections=1, fds=SESSION_FDS)
        except LimitExceeded as exc:
            self.peer_event(EventKind.PEER_REJECTED, str(exc), who=Who(pid=pid, uid=uid, gid=gid))
            return error_reply(exc)

    def reject(self, reason: str, pid: int | None, uid: int | None, *, who: Who | None = None) -> m.Error:
        """A peer refused at admission: the event (within its uid's burst) and the answer."""
        self.peer_event(EventKind.PEER_REJECTED, reason, who=who or Who(pid=pid, uid=uid))
        return error_reply(PermissionDenied(reason if reason.startswith("permission denied") else f"permission denied: {reason}"))

    def join(self, peer: VerifiedPeer, charge: Charge) -> tuple[Member | None, m.Error | None, list[Action]]:
        """A verified peer: a member, or the error to refuse it with; and the
        handshakes evicted to make room for it."""
        try:
            self.policy.admit(peer.identity)
        except Exception as exc:
            if not isinstance(exc, PermissionDenied):
                log.exception("policy check failed unexpectedly")
                exc = PermissionDenied(f"policy check failed ({type(exc).__name__})")
            identity = peer.identity
            who = Who(pid=identity.pid, uid=identity.uid, gid=identity.gid, exe=identity.exe_path)
            return None, self.reject(str(exc), identity.pid, identity.uid, who=who), []
        actions = self._make_room_for_handshake()
        member = Member(peer, charge, self._clock())
        self.members.add(member)
        self.events.count("peers_verified")
        return member, None, actions

    def _make_room_for_handshake(self) -> list[Action]:
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
        # Parked members wait on the broker (or, with wait=, on another peer),
        # each kind bounded by a cap of its own.
        incomplete = [s for s in self.members if not s.attached and not s.parked]
        actions: list[Action] = []
        while len(incomplete) >= self.limits.max_incomplete_connections:
            per_uid = collections.Counter(s.uid for s in incomplete)
            greediest = max(per_uid, key=lambda uid: per_uid[uid])
            victim = min((s for s in incomplete if s.uid == greediest), key=lambda s: s.accepted_at)
            incomplete.remove(victim)
            self.events.count("handshakes_evicted")
            reason = "too many connections are still in their handshake; dropped the oldest"
            self.peer_event(
                EventKind.REQUEST_REFUSED,
                f"{len(incomplete) + 1} handshakes in flight (max_incomplete_connections): {reason}", who=victim.who(),
            )
            actions.append(Fail(victim, error_reply(LimitExceeded(reason))))
        return actions

    def expired(self, now: float) -> list[Action]:
        """Members whose handshake outlived handshake_timeout, and held attaches whose wait is over."""
        deadline = self.limits.handshake_timeout
        actions: list[Action] = []
        for name, held in list(self.awaiting.items()):
            for member, request in [(s, r) for s, r in held if s.wait_until is not None and s.wait_until <= now]:
                self._unhold(member)
                member.accepted_at = now  # answered: no handshake timeout on top
                what = "a producer" if self._waits_for_producer(name) else "the channel"
                actions.append(Send(member, error_reply(Timeout(
                    f"waited {request.wait:g}s for {what} of {name!r} to appear; none did"
                ))))
                # The client gives up on a Timeout: closing now, rather than
                # at handshake_timeout, keeps an honest wait out of the audit.
                actions.append(Close(member))
        for member in [s for s in self.members if not s.attached and not s.parked and now - s.accepted_at >= deadline]:
            self.events.count("handshake_timeouts")
            reason = f"handshake not finished within {deadline:g}s"
            self.peer_event(EventKind.REQUEST_REFUSED, f"{reason} (handshake_timeout)", who=member.who())
            actions.append(Fail(member, error_reply(Timeout(reason))))
        return actions

    def next_deadline(self) -> float | None:
        """When the next handshake or held attach expires (monotonic), if any."""
        pending = [s.accepted_at + self.limits.handshake_timeout for s in self.members if not s.attached and not s.parked]
        pending += [s.wait_until for held in self.awaiting.values() for s, _ in held if s.wait_until is not None]
        return min(pending) if pending else None

    def _waits_for_producer(self, name: str) -> bool:
        channel = self.channels.get(name)
        return channel is not None and channel.spec.ring and not any(s.role == "producer" for s in channel.members)

    def _hold(self, member: Member, request: m.Attach) -> None:
        """Answer later: when the channel exists (a ring consumer: with a producer), or at the deadline."""
        held = sum(1 for waiting in self.awaiting.values() for s, _ in waiting if s.uid == member.uid)
        if held >= self.limits.max_waiting_per_uid:
            raise LimitExceeded(
                f"uid {member.uid} already has {held} attach requests waiting for their channels "
                f"(max_waiting_per_uid = {self.limits.max_waiting_per_uid})"
            )
        assert request.wait is not None
        member.parked = True
        member.wait_until = self._clock() + request.wait
        self.awaiting.setdefault(request.channel, []).append((member, request))

    def _unhold(self, member: Member) -> None:
        member.parked = False
        member.wait_until = None
        for name in list(self.awaiting):
            held = [(s, r) for s, r in self.awaiting[name] if s is not member]
            if held:
                self.awaiting[name] = held
            else:
                del self.awaiting[name]

    def _release_held(self, name: str) -> list[Action]:
        """A channel appeared or got a producer: answer what waited for it."""
        actions: list[Action] = []
        for member, request in list(self.awaiting.get(name, [])):
            if name in self.channels and not (request.role == "consumer" and self._waits_for_producer(name)):
                self._unhold(member)
                # Its handshake clock starts again: a refusal now is answered
                # like any other, not followed by a handshake timeout.
                member.accepted_at = self._clock()
                actions += self._answer_late(member, request)
        return actions

    def _answer_late(self, member: Member, request: m.Attach) -> list[Action]:
        """Answer a request held since an earlier turn (wait=, or a new
        segment's pages): its fds go out only after a fresh check of the
        peer, which may have exec()ed another binary meanwhile."""
        return [
            dataclasses.replace(a, reverify=True) if isinstance(a, Send) and a.member is member and a.fds else a
            for a in self.request(member, request)
        ]

    def peer_event(self, kind: EventKind, detail: str, *, who: Who, uids: tuple[int, ...] | None = None) -> None:
        """Record an event a peer caused (logged at warning), within its uid's
        burst; past it, only count it.

        ``uids``: the event may be any of these uids' doing (who.uid then
        None): it counts against each one's burst, and is only counted once
        any of them has spent its own."""
        limiter = self.identity_events if kind is EventKind.IDENTITY_CHANGED else self.refusals
        charged = uids if uids is not None else () if who.uid is None else (who.uid,)
        now = self._clock()
        limited = [uid for uid in charged if limiter.limited(uid, now)]
        if not limited:
            for uid in charged:
                limiter.allow(uid, now)
            self.events.record(kind, detail, who=who)
        else:
            for uid in limited:
                limiter.note_dropped(uid, now)
            self.events.count(kind.value)
            self.events.count("events_suppressed")

    # -- requests ----------------------------------------------------------------
    def request(self, member: Member, message: m.Message) -> list[Action]:
        """A decoded request of ``member``; every failure is answered, none escapes."""
        try:
            return self._handle(member, message)
        except ShmBrokerError as exc:
            # Every refusal is audited, with who asked for what.
            channel = getattr(message, "channel", None)
            role = getattr(message, "role", None)
            self.peer_event(
                EventKind.REQUEST_REFUSED, f"{message.TYPE}: {exc}",
                who=member.who(channel=channel, role=role, rule=self.policy.rule_of(member.identity)),
            )
            return [Send(member, error_reply(exc))]
        except Exception as exc:  # never let one client's request kill the broker
            log.exception("internal error handling %s from pid %d", message.TYPE, member.identity.pid)
            return [Send(member, error_reply(ShmBrokerError(f"internal broker error ({type(exc).__name__}); see the broker log")))]

    def _handle(self, member: Member, message: m.Message) -> list[Action]:
        if isinstance(message, m.Hello):
            return [Send(member, m.Welcome(version=m.PROTOCOL_VERSION, broker_pid=self._broker_info().get("pid", 0)))]
        if isinstance(message, m.Attach):
            return self._attach(member, message)
        if isinstance(message, m.Detach):
            actions: list[Action] = []
            self._end_attachment(member, recheck_identity=True, actions=actions)
            return [*actions, Send(member, m.Detached()), Close(member)]
        if isinstance(message, m.StatusRequest):
            if not self.policy.may_query_status(member.identity):
                raise PermissionDenied(
                    f"permission denied: uid {member.uid} may not query status ({self.policy.status.describe()})"
                )
            return [Send(member, m.StatusReply(status=self.status()))]
        if isinstance(message, m.Cursors):
            return self._cursor_pages(member)
        raise ProtocolError(f"unexpected {message.TYPE}")  # pragma: no cover - the connection only surfaces requests

    def handed_over(self, member: Member, sender: int) -> list[Action]:
        """Another process wrote on a verified connection (the driver knows who
        sent each write, SO_PASSCRED): the socket was passed on (SCM_RIGHTS,
        or inherited by a child).  Nothing it asks for is answered."""
        identity = member.identity
        who = f"pid {sender}" if sender > 0 else "a process outside the broker's pid namespace"
        self.peer_event(
            EventKind.IDENTITY_CHANGED,
            f"{who} wrote on the connection verified for pid {identity.pid} ({quote(identity.exe_path)}): "
            "the socket was handed to another process; the connection was closed",
            who=member.who(),
        )
        return [Fail(member, error_reply(PermissionDenied(
            f"permission denied: this connection was verified for pid {identity.pid}, not for the process "
            "writing on it; connect anew"
        )))]

    def protocol_error(self, member: Member, exc: ProtocolError) -> list[Action]:
        self.events.count("protocol_errors")
        self.peer_event(EventKind.REQUEST_REFUSED, f"protocol error: {exc}", who=member.who())
        return [Fail(member, error_reply(ProtocolError(f"protocol error: {exc}")))]

    def leave(self, member: Member, *, recheck_identity: bool) -> list[Action]:
        """The member's connection is gone (or being closed): release all it holds."""
        if member not in self.members:
            return []
        self.members.discard(member)
        if member.parked:
            for channel in self.channels.values():
                channel.waiting = [(s, r) for s, r in channel.waiting if s is not member]
            self._unhold(member)
        actions: list[Action] = []
        self._end_attachment(member, recheck_identity=recheck_identity, actions=actions)
        return actions

    # -- attachments -------------------------------------------------------------
    def _attach(self, member: Member, request: m.Attach) -> list[Action]:
        identity = member.identity
        self.policy.authorize_attach(identity, request.channel, request.role)
        if request.role == "consumer":
            self._check_read_only_holds(identity, request.channel)
        channel = self.channels.get(request.channel)
        if request.wait and request.role == "consumer" and (channel is None or self._waits_for_producer(request.channel)):
            self._hold(member, request)
            return []
        if channel is None:
            channel = self._create_channel(member, request)
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
        actions: list[Action] = []
        if channel.segment is None:
            actions += self._new_segment(channel, member)
        assert channel.segment is not None
        if not channel.segment.ready:
            # Its pages are still being reserved (a step per round): answer
            # when they are; the driver reads nothing more from this peer.
            member.parked = True
            channel.waiting.append((member, request))
            return actions
        return actions + self._finish_attach(member, request, channel)

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
        owner = self.euid
        if identity.uid != owner or owner == 0 or self.policy.permits(identity, channel, "producer"):
            return
        raise PermissionDenied(
            f"permission denied: uid {identity.uid} is the broker's own uid, so it owns every segment the broker "
            f"creates and could make a read-only one writable (fchmod, then reopen /proc/self/fd); its "
            f"consumer-only rule for {channel!r} cannot be enforced.  Run the broker as a user of its own "
            "(the shipped units use `shmbroker`) or this consumer as another uid"
        )

    def _finish_attach(self, member: Member, request: m.Attach, channel: Channel) -> list[Action]:
        identity = member.identity
        segment, ring = channel.segment, channel.ring
        assert segment is not None
        consumer = request.role == "consumer"
        nfds = 1 + (0 if ring is None else len(CONSUMER_FD_NAMES if consumer else producer_fd_names()))
        # Charged before anything changes, so a refusal leaves nothing behind.
        charge = self.ledger.charge(member.uid, fds=nfds)
        attachment_charge: Charge | None = None
        try:
            if ring is not None and consumer:
                attachment_charge = self.ledger.charge(member.uid, fds=1)  # its cursor page
            # Consumers of memfd channels get the read-only fd (see Segment):
            # they cannot change the payload.  Ring consumers write only to the
            # ring's control page and their own cursor page, memfds of their own
            # (_ring/broker.py).
            read_only = consumer and segment.readonly_fd >= 0
            fds: list[int] = [segment.readonly_fd if read_only else segment.fd]
            fd_names: tuple[str, ...] = ("segment",)
            slot: int | None = None
            if ring is not None:
                if not consumer:
                    other = ring.producer
                    describe = f"pid {other.identity.pid}" if isinstance(other, Member) else "another peer"
                    ring_fds, ring_names = ring.attach_producer(member, channel.name, describe)
                else:
                    slot, ring_fds, ring_names = ring.attach_consumer(member, channel.name)
                fds, fd_names = fds + ring_fds, fd_names + ring_names
        except BaseException:
            charge.release()
            if attachment_charge is not None:
                attachment_charge.release()
            if not channel.members and not channel.waiting:  # a segment made for this refused attach: wipe it now
                self._release_segment(channel)
            raise
        channel.members.add(member)
        if not read_only:
            channel.add_writer(member.uid, member.who(channel=channel.name, role=request.role))
        member.channel, member.segment, member.role, member.ring = channel, segment, request.role, ring
        member.attachment_charge = attachment_charge
        member.attached_at = self._wall_clock()
        self.events.count("attaches")
        # Debug, not info: a peer the policy admits may attach and detach in
        # a loop, and a line each would let it flood the log (the counters
        # in status keep the totals; refusals stay warnings).
        log.debug(
            "attached pid %d uid %d exe %s to channel %r as %s (size %d, generation %d)",
            identity.pid, identity.uid, quote(identity.exe_path), channel.name, request.role, segment.size, segment.generation,
        )
        reply = m.Attached(
            channel=channel.name, role=request.role, size=segment.size,
            generation=segment.generation, layout=LAYOUT_VERSION, fds=fd_names,
            ring=ring is not None, slot=slot, start=None if ring is None or slot is None else ring.starts[slot],
        )
        actions: list[Action] = [Send(member, reply, tuple(fds), charge)]
        if request.role == "producer" and channel.name in self.awaiting:
            actions += self._release_held(channel.name)
        return actions

    def _cursor_pages(self, member: Member) -> list[Action]:
        """The ring's producer asks for its consumers' cursor pages (docs/ring.md, "cursors").

        Nobody else gets them: a consumer holding another's page could move
        that cursor, which is the attack the pages exist to stop."""
        ring = member.ring
        if ring is None or member.channel is None:
            raise PermissionDenied(
                "permission denied: only the producer attached to a ring channel may fetch its consumers' cursor pages"
            )
        # RingState decides who its producer is (and refuses once closed).
        slots, serials, fds = ring.cursor_pages(member, member.channel.name)
        charge = self.ledger.charge(member.uid, fds=len(fds)) if fds else None
        return [Send(member, m.CursorPages(slots=tuple(slots), serials=tuple(serials)), tuple(fds), charge)]

    def _create_channel(self, member: Member, request: m.Attach) -> Channel:
        identity = member.identity
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

    def _new_segment(self, channel: Channel, member: Member) -> list[Action]:
        """A segment for ``channel``, charged to the uid whose attach makes it.

        On-demand channels also count against that uid's segment and byte
        quotas; configured ones are the operator's, so only their fds do."""
        spec = channel.spec
        amounts = {"fds": (2 if spec.backend == "memfd" else 1) + (RING_FDS if spec.ring else 0)}
        if not channel.configured:
            amounts.update(segments=1, bytes=spec.size)
        try:
            charge = self.ledger.charge(member.uid, **amounts)
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
        channel.writers = {}
        self.events.count("segments_created")
        if segment.ready:
            return []
        return [Schedule(charge.uid, lambda: self._reserve_step(channel, segment))]

    def _reserve_step(self, channel: Channel, segment: Segment) -> tuple[bool, list[Action]]:
        if channel.segment is not segment:
            return True, []  # revoked meanwhile; the revocation told the waiters
        try:
            if not segment.reserve():
                return False, []
        except OSError as exc:
            return True, self._segment_failed(channel, segment, exc)
        actions: list[Action] = []
        # One waiter at a time off the list, so a waiter whose attach fails
        # does not release the segment under the ones still waiting.
        while channel.waiting and channel.segment is segment:
            member, request = channel.waiting.pop(0)
            member.parked = False
            actions += self._answer_late(member, request)
        if channel.segment is segment and not channel.members and not channel.waiting:
            self._release_segment(channel, actions=actions)
        return True, actions

    def _segment_failed(self, channel: Channel, segment: Segment, exc: OSError) -> list[Action]:
        """Reserving the pages failed (/dev/shm or memory full): refuse every waiter, keep serving."""
        log.warning("could not reserve the pages of channel %r: %s", channel.name, exc.strerror or exc)
        channel.segment = None
        self._close_ring(channel)
        segment.begin_wipe(free=True)  # never handed out; frees what was reserved
        actions = self._dispose(segment)
        actions += self._fail_waiters(channel, LimitExceeded(_no_room(channel, exc)))
        self._forget_unused(channel)
        return actions

    def _fail_waiters(self, channel: Channel, error: ShmBrokerError) -> list[Action]:
        waiting, channel.waiting = channel.waiting, []
        actions: list[Action] = []
        for member, _ in waiting:
            member.parked = False
            actions.append(Send(member, error_reply(error)))
        return actions

    def _end_attachment(self, member: Member, *, recheck_identity: bool, actions: list[Action]) -> None:
        channel, segment = member.channel, member.segment
        if channel is None:
            return None
        member.channel = member.segment = None
        channel.members.discard(member)
        channel.revoked_members.discard(member)
        if member.ring is not None:
            member.ring.detach(member)  # frees a consumer slot so it cannot stall the producer
            member.ring = None
        if member.attachment_charge is not None:
            member.attachment_charge.release()
            member.attachment_charge = None
        self.events.count("detaches")
        if recheck_identity:
            # Whether it still runs what it was admitted with: the driver
            # asks (maybe the exe inspector, while others are served) and
            # reports to rechecked().
            actions.append(Recheck(member, channel, segment))
        log.debug("detached pid %d from channel %r", member.identity.pid, channel.name)
        if not channel.members and not channel.waiting:
            self._release_segment(channel, actions=actions)
        elif member.role == "producer" and segment is channel.segment:
            self._apply_liveness_rule(channel, actions)

    def changed_before_answer(self, member: Member, reason: str) -> None:
        """A held attach's peer runs another executable now: its answer was
        not sent.  Recorded; nothing is revoked, since it received nothing."""
        self.peer_event(
            EventKind.IDENTITY_CHANGED, f"{reason}; its held attach was not answered",
            who=member.who(channel=member.channel.name if member.channel else None, role=member.role),
        )

    def rechecked(self, recheck: Recheck, reason: str | None) -> list[Action]:
        """The re-check of a member that left: if it runs something else now
        (it exec()ed after it was admitted), record it, and wipe and revoke
        the segment it held for everyone still attached to it."""
        if reason is None:
            return []
        member, channel, segment = recheck.member, recheck.channel, recheck.segment
        self.peer_event(EventKind.IDENTITY_CHANGED, reason, who=member.who(channel=channel.name, role=member.role))
        actions: list[Action] = []
        if segment is not None and segment is channel.segment:
            self._revoke(channel, actions=actions)
        return actions

    def _apply_liveness_rule(self, channel: Channel, actions: list[Action]) -> None:
        """``wipe_when = "producer_gone"``: no producer left, so wipe for the consumers too."""
        if channel.spec.wipe_when != "producer_gone" or channel.segment is None:
            return
        if any(s.role == "producer" for s in channel.members):
            return
        generation = channel.segment.generation
        self._revoke(channel, actions=actions)
        self.events.count("liveness_wipes")
        log.info("last producer of channel %r left; wiped and revoked generation %d (wipe_when = producer_gone)", channel.name, generation)

    # -- revocation and wipes ----------------------------------------------------
    def _revoke(self, channel: Channel, *, actions: list[Action], at_once: bool = False) -> None:
        """Wipe the channel's segment for everyone attached and stop handing it out.

        The revoked word is set at once; wiping the rest is segment work done
        in steps (at once at shutdown and on panic).  The segment, and a
        posix segment's lease, is released only when the wipe is complete: an
        opener blocked by the lease break sees nothing but zeros."""
        segment = channel.segment
        if segment is None:
            return
        channel.segment = None
        # Members still attached may read their mapping: overwrite, so their
        # reads need no new page; nobody attached: free the pages.
        problem = segment.begin_wipe(free=not (channel.members and segment.ready))
        # They stay connected, but no longer hold the channel: the next
        # segment's last detach and wipe_when count only its own members.
        channel.revoked_members |= channel.members
        channel.members = set()
        if problem is not None:
            self.events.record(
                EventKind.WIPE_FAILED, f"segment of channel {channel.name!r} (generation {segment.generation}): {problem}",
                channel=channel.name,
            )
        self._close_ring(channel)
        if channel.waiting:
            actions += self._fail_waiters(channel, ChannelRevoked(
                f"channel {channel.name!r} was revoked before its segment was ready; attach again"
            ))
        if segment.ready:
            self.events.count("segments_wiped")
        actions += self._dispose(segment, at_once=at_once)

    def _dispose(self, segment: Segment, *, at_once: bool = False) -> list[Action]:
        """Finish the wipe begun on ``segment`` in steps charged to its creator, then close it."""
        charge = self._segment_charges.get(segment)
        if at_once or charge is None or segment.length <= STEP_BYTES:
            segment.wipe()
            self._close_segment(segment)
            return []
        self._wiping[segment] = charge
        return [Schedule(charge.uid, lambda: (self._wipe_step(segment), []))]

    def _wipe_step(self, segment: Segment) -> bool:
        if segment not in self._wiping:
            return True  # finished at once meanwhile (panic, shutdown)
        if not segment.wipe_step():
            return False
        del self._wiping[segment]
        self._close_segment(segment)
        return True

    def finish_wipes(self) -> None:
        """Complete every wipe in progress now (panic, shutdown)."""
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
        """After a wipe: sleepers learn of the revocation by their periodic re-check; close the eventfds."""
        if channel.ring is not None:
            channel.ring.close()
            channel.ring = None

    def _release_segment(self, channel: Channel, *, actions: list[Action] | None = None, at_once: bool = False) -> None:
        """Nobody is attached any more: zeroize and free the memory."""
        if channel.segment is not None:
            self._revoke(channel, actions=actions if actions is not None else [], at_once=at_once)
        self._forget_unused(channel)

    def _forget_unused(self, channel: Channel) -> None:
        """An on-demand channel with no segment and nobody attached (to any of
        its generations) or waiting disappears; until then its generation
        keeps counting, so a revoked peer and a newcomer never share one."""
        if channel.configured or channel.members or channel.revoked_members or channel.waiting:
            return
        if channel.segment is not None:
            return
        if self.channels.get(channel.name) is channel:
            del self.channels[channel.name]

    def check_segments(self) -> list[Action]:
        """Each tick, and at once on SIGIO: truncated posix segments and broken leases.

        Either revokes the segment, so each generation is reported at most
        once.  Both are checked: a peer's truncation must not hide an
        outsider's open."""
        actions: list[Action] = []
        for channel in list(self.channels.values()):
            segment = channel.segment
            if segment is None:
                continue
            truncated = segment.truncated()
            lease_broken = not segment.lease_intact()
            if not (truncated or lease_broken):
                continue
            where = f"segment of channel {channel.name!r} (generation {segment.generation})"
            if truncated:
                # A peer ftruncate()d an unsealable (posix) segment.  The wipe
                # restores the size, so peers that have not touched the
                # mapping yet see a revoked segment instead of SIGBUS.
                self._truncated(channel, where)
            if lease_broken:
                # Someone open()ed the unlinked object (root through
                # /proc/PID/fd/N).  The wipe comes before the lease is
                # released: the opener's open() is blocked until then, so it sees zeros.
                self.events.record(
                    EventKind.LEASE_BROKEN, f"{where} was opened or truncated by another process; wiped and revoked",
                    channel=channel.name,
                )
            self._revoke(channel, actions=actions)
        return actions

    def _truncated(self, channel: Channel, where: str) -> None:
        """Only a peer handed the read-write fd can have done it (ftruncate
        on an fd does not break the lease; anyone else must open the object,
        which does): the event is theirs, counted against their uids' bursts
        like any other event a peer causes.  The broker cannot tell which of
        several holders did it, so it names them all."""
        holders = [w for kept in channel.writers.values() for w in kept]
        uids = tuple(sorted(channel.writers))
        if len(holders) == 1:
            who = holders[0]
        else:
            who = Who(uid=uids[0] if len(uids) == 1 else None, channel=channel.name)
        names = ", ".join(f"pid {w.pid} uid {w.uid}" for w in holders[:8])
        names += f" and {len(holders) - 8} more" if len(holders) > 8 else ""
        self.peer_event(
            EventKind.SEGMENT_TRUNCATED,
            f"{where} was truncated by a peer holding it writable ({names or 'none known'}); size restored, "
            'wiped and revoked (use backend = "memfd" to seal it)',
            who=who, uids=uids,
        )

    def refusal_summaries(self, now: float) -> None:
        """One event per uid whose burst ran out in a window that ended."""
        for uid, dropped in [*self.refusals.expired(now), *self.identity_events.expired(now)]:
            self.events.record(
                EventKind.REFUSALS_SUPPRESSED,
                f"uid {uid} caused {dropped} more refusal(s) or security event(s) in the last "
                f"{self.limits.refusal_window:g}s, counted but not answered, logged or kept one by one "
                "(refusals_per_uid_burst)",
                uid=int(uid) if isinstance(uid, int) else None,
            )

    def panic(self) -> list[Action]:
        """SIGUSR1: wipe and revoke every segment at once, and finish every wipe in progress."""
        actions: list[Action] = []
        wiped = 0
        for channel in list(self.channels.values()):
            if channel.segment is not None:
                self._revoke(channel, actions=actions, at_once=True)
                wiped += 1
        self.finish_wipes()
        self.events.record(EventKind.PANIC_WIPE, f"panic signal: wiped and revoked {wiped} segment(s)")
        return actions

    def shutdown(self) -> None:
        """Wipe every segment now; the driver has closed every member already."""
        for channel in list(self.channels.values()):
            try:
                self._release_segment(channel, at_once=True)
            except Exception:
                log.exception("could not wipe channel %r at shutdown; continuing", channel.name)
        self.finish_wipes()

    # -- status ----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        channels = []
        for channel in sorted(self.channels.values(), key=lambda c: c.name):
            peers = [
                {
                    "pid": s.identity.pid,
                    "uid": s.identity.uid,
                    "gid": s.identity.gid,
                    "exe": s.identity.exe_path,
                    # Verified at accept like the exe (docs/security.md says
                    # how far each can be trusted).
                    "unit": s.identity.unit,
                    "cgroup": s.identity.cgroup,
                    "label": s.identity.label,
                    "role": s.role,
                    "generation": s.segment.generation if s.segment else None,
                    "revoked": s in channel.revoked_members,
                    "attached_at": s.attached_at,
                }
                for s in sorted(channel.members | channel.revoked_members, key=lambda s: s.attached_at or 0)
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
        broker = dict(self._broker_info())
        broker["fds_charged"] = self.ledger.total_used(Resource.FDS)
        broker["fd_budget"] = self.ledger.total.get(Resource.FDS)
        return {
            "broker": broker,
            "channels": channels,
            "connections": len(self.members),
            "counters": dict(sorted(self.events.counters.items())),
            "security_events": [e.as_dict() for e in self.events.events],
            **self._status_extra(),
        }


def _no_room(channel: Channel, exc: OSError) -> str:
    where = "memory" if channel.spec.backend == "memfd" else "/dev/shm (or memory)"
    return (
        f"could not reserve {channel.spec.size} bytes for channel {channel.name!r}: {exc.strerror or exc}; "
        f"{where} is full, try again later or use a smaller size"
    )
