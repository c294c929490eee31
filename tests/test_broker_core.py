"""The broker's sans-IO core, in-process: quotas, conflicts, parking,
eviction, revocation and the wipe rules, decided without a socket.

Segments and ring pages are real kernel objects (the core owns them); the
peers are identities handed in, as the driver hands in verified ones.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import pytest

from shmbroker._broker import core as c
from shmbroker._broker.auth import VerifiedPeer
from shmbroker._broker.config import BrokerConfig, ChannelSpec
from shmbroker._broker.policy import Identity, Policy, Principals, Rule
from shmbroker._broker.quota import Charge
from shmbroker._wire import messages as m
from shmbroker.limits import Limits

EXE = (1, 2)
_pids = itertools.count(1000)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_core(
    *, rules: tuple[Rule, ...] | None = None, channels: dict[str, ChannelSpec] | None = None,
    euid: int = 0, **limits: Any,
) -> tuple[c.BrokerCore, dict[int, str], Clock]:
    rules = rules or (Rule(Principals(uids=frozenset({0, 1000, 2000})), None, create=True),)
    config = BrokerConfig(
        policy=Policy(rules=rules, status=Principals(uids=frozenset({0}))),
        channels=dict(channels or {}), limits=Limits(**limits),
    )
    changed: dict[int, str] = {}  # pid -> what it runs now, for the re-check at detach
    clock = Clock()
    core = c.BrokerCore(config, euid=euid, broker_info=lambda: {"pid": 1}, clock=clock)
    core.changed = changed  # type: ignore[attr-defined]
    return core, changed, clock


def join(core: c.BrokerCore, uid: int = 1000) -> c.Member:
    charge = core.admit(0, uid, uid, ())
    assert isinstance(charge, Charge), charge
    peer = VerifiedPeer(Identity(next(_pids), uid, uid, (), EXE, "/usr/bin/peer"), -1, "test")
    member, refusal, _ = core.join(peer, charge)
    assert member is not None, refusal
    return member


def run(core: c.BrokerCore, actions: list[c.Action]) -> list[c.Action]:
    """Carry out Schedule and Recheck actions as the driver would (the
    re-check answers from the test's ``changed`` table); return the rest."""
    out: list[c.Action] = []
    pending = list(actions)
    while pending:
        action = pending.pop(0)
        if isinstance(action, c.Schedule):
            done, more = False, []
            while not done:
                done, new = action.step()
                more += new
            pending += more
        elif isinstance(action, c.Recheck):
            pending += core.rechecked(action, core.changed.get(action.member.identity.pid))  # type: ignore[attr-defined]
        else:
            out.append(action)
    return out


def attach(core: c.BrokerCore, member: c.Member, channel: str, role: str = "producer", **kw: Any) -> m.Message:
    actions = run(core, core.request(member, m.Attach(channel=channel, role=role, **kw)))
    sends = [a for a in actions if isinstance(a, c.Send) and a.member is member]
    assert len(sends) == 1, actions
    if sends[0].charge is not None:
        sends[0].charge.release()  # the driver does once the peer read the fds
    return sends[0].message


def leave(core: c.BrokerCore, member: c.Member) -> list[c.Action]:
    actions = run(core, core.leave(member, recheck_identity=True))
    member.charge.release()
    return actions


def error_code(message: m.Message) -> str:
    assert isinstance(message, m.Error), message
    return message.code


@pytest.fixture(autouse=True)
def _shutdown_cores(monkeypatch: pytest.MonkeyPatch) -> Any:
    made: list[c.BrokerCore] = []
    real_init = c.BrokerCore.__init__

    def init(self: c.BrokerCore, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(c.BrokerCore, "__init__", init)
    yield
    for core in made:
        core.shutdown()


def test_an_attach_gets_its_segment_and_the_last_detach_wipes_it() -> None:
    core, _, _ = make_core()
    producer = join(core)
    reply = attach(core, producer, "ch", size=4096)
    assert isinstance(reply, m.Attached) and reply.generation == 1
    segment = core.channels["ch"].segment
    assert segment is not None and segment.ready
    leave(core, producer)
    assert segment.revoked and segment.fd < 0
    assert "ch" not in core.channels  # created on demand, forgotten when empty


def test_a_size_or_kind_mismatch_is_a_conflict() -> None:
    core, _, _ = make_core()
    first, second = join(core), join(core)
    attach(core, first, "ch", size=4096)
    assert error_code(attach(core, second, "ch", size=8192)) == "conflict"
    assert error_code(attach(core, second, "ch", size=4096, ring=True)) == "conflict"


def test_segment_and_byte_quotas_are_charged_to_the_creator_and_given_back() -> None:
    core, _, _ = make_core(max_segments_per_uid=2, max_bytes_per_uid=3 * 4096)
    members = [join(core) for _ in range(4)]
    attach(core, members[0], "a", size=4096)
    attach(core, members[1], "b", size=4096)
    reply = attach(core, members[2], "c", size=4096)
    assert error_code(reply) == "limit" and "max_segments_per_uid" in reply.message  # type: ignore[attr-defined]
    other = join(core, uid=2000)  # another uid's quota is its own
    assert isinstance(attach(core, other, "c", size=4096), m.Attached)
    leave(core, members[0])
    assert isinstance(attach(core, members[3], "d", size=4096), m.Attached)


def test_fds_are_charged_per_uid() -> None:
    core, _, _ = make_core(max_fds_per_uid=20)
    held = []
    with pytest.raises(AssertionError):
        for i in range(10):
            member = join(core)
            held.append(member)
            reply = attach(core, member, f"r{i}", size=65536, ring=True)
            assert isinstance(reply, m.Attached), reply
    assert "max_fds_per_uid" in reply.message  # type: ignore[attr-defined]
    assert isinstance(core.admit(0, 2000, 2000, ()), Charge)  # another uid is untouched


def test_a_big_segment_parks_the_attach_until_its_pages_are_reserved() -> None:
    core, _, _ = make_core()
    producer = join(core)
    actions = core.request(producer, m.Attach(channel="big", role="producer", size=8 << 20))
    assert producer.parked and [type(a) for a in actions] == [c.Schedule]
    waiting = join(core)
    assert core.request(waiting, m.Attach(channel="big", role="consumer")) == [] and waiting.parked
    replies = run(core, actions)
    attached = [a for a in replies if isinstance(a, c.Send) and isinstance(a.message, m.Attached)]
    assert {a.member for a in attached} == {producer, waiting}
    assert not producer.parked and not waiting.parked
    # Answered turns after they asked: each peer is checked again before its fds go out.
    assert all(a.reverify for a in attached)


def test_the_greediest_uids_oldest_handshake_is_evicted() -> None:
    core, _, clock = make_core(max_incomplete_connections=3)
    mine = join(core, uid=2000)
    theirs = []
    for _ in range(2):
        clock.now += 1
        theirs.append(join(core))
    charge = core.admit(0, 2000, 2000, ())
    assert isinstance(charge, Charge)
    peer = VerifiedPeer(Identity(next(_pids), 2000, 2000, (), EXE, "/x"), -1, "test")
    _, _, evicted = core.join(peer, charge)
    assert [a.member for a in evicted if isinstance(a, c.Fail)] == [theirs[0]]
    assert mine not in [a.member for a in evicted if isinstance(a, c.Fail)]


def test_handshakes_expire_but_attached_members_do_not() -> None:
    core, _, clock = make_core(handshake_timeout=5.0)
    idle, attached = join(core), join(core)
    attach(core, attached, "ch", size=4096)
    clock.now += 6
    assert [a.member for a in core.expired(clock.now)] == [idle]


def test_an_identity_change_at_detach_revokes_the_segment_for_everyone() -> None:
    core, changed, _ = make_core()
    producer, consumer = join(core), join(core)
    attach(core, producer, "ch", size=4096)
    attach(core, consumer, "ch", role="consumer")
    segment = core.channels["ch"].segment
    changed[producer.identity.pid] = "now runs /tmp/evil"
    leave(core, producer)
    assert segment is not None and segment.revoked
    assert consumer in core.channels["ch"].revoked_members
    assert [e.kind.value for e in core.events.events] == ["identity_changed"]


def test_a_member_left_on_a_revoked_segment_does_not_keep_the_next_one() -> None:
    core, _, _ = make_core(channels={"ch": ChannelSpec(name="ch", size=4096, wipe_when="producer_gone")})
    stale = join(core)
    attach(core, stale, "ch")
    run(core, core.panic())
    producer, consumer = join(core), join(core)
    attach(core, producer, "ch")
    attach(core, consumer, "ch", role="consumer")
    second = core.channels["ch"].segment
    assert second is not None and second.generation == 2
    leave(core, producer)  # the last producer of generation 2
    assert second.revoked, "the stale producer kept the liveness rule from firing"


def test_a_consumer_of_the_brokers_own_uid_needs_the_producer_role_too() -> None:
    consumer_only = Rule(Principals(uids=frozenset({1000})), None, roles=frozenset({"consumer"}))
    producer = Rule(Principals(uids=frozenset({2000})), None, create=True)
    core, _, _ = make_core(rules=(producer, consumer_only), euid=1000)
    attach(core, join(core, uid=2000), "ch", size=4096)
    reply = attach(core, join(core, uid=1000), "ch", role="consumer")
    assert error_code(reply) == "permission_denied" and "broker's own uid" in reply.message  # type: ignore[attr-defined]


def test_only_the_rings_producer_gets_the_cursor_pages() -> None:
    core, _, _ = make_core()
    producer, consumer = join(core), join(core)
    attach(core, producer, "ring", size=65536, ring=True)
    attach(core, consumer, "ring", role="consumer")
    (reply,) = core.request(consumer, m.Cursors())
    assert isinstance(reply, c.Send) and error_code(reply.message) == "permission_denied"
    (pages,) = core.request(producer, m.Cursors())
    assert isinstance(pages, c.Send) and isinstance(pages.message, m.CursorPages) and len(pages.fds) == 1
    assert pages.charge is not None
    pages.charge.release()


def test_a_uid_no_rule_names_is_answered_within_its_burst_then_dropped() -> None:
    core, _, clock = make_core(refusals_per_uid_burst=3, refusal_window=10.0)
    outcomes = [core.admit(0, 4242, 4242, ()) for _ in range(5)]
    assert [type(o).__name__ for o in outcomes] == ["Error"] * 3 + ["NoneType"] * 2
    clock.now += 11
    core.refusal_summaries(clock.now)
    kinds = [e.kind.value for e in core.events.events]
    assert kinds == ["peer_rejected"] * 3 + ["refusals_suppressed"]
    assert isinstance(core.admit(0, 4242, 4242, ()), m.Error)  # a new window, a new burst


def test_a_hand_over_is_an_event_and_a_failure() -> None:
    core, _, _ = make_core()
    member = join(core)
    (action,) = core.handed_over(member, 4321)
    assert isinstance(action, c.Fail) and action.error.code == "permission_denied"
    assert core.events.events[-1].kind.value == "identity_changed" and "pid 4321" in core.events.events[-1].detail


# -- every refusal is a security event, with who asked for what ------------------
def _refusals() -> dict[str, Any]:
    """name -> (core kwargs, act(core) -> None, expected kind, expected fields)."""
    only_consume = Rule(Principals(uids=frozenset({1000})), None, channels=("ro",), roles=frozenset({"consumer"}))
    no_create = Rule(Principals(uids=frozenset({1000})), None, channels=("*",), create=False)

    def attach_as(channel: str, role: str, **kw: Any) -> Any:
        return lambda core: core.request(join(core), m.Attach(channel=channel, role=role, **kw))

    return {
        "uid no rule names": (
            {}, lambda core: core.admit(7, 4242, 4243, ()), "peer_rejected", {"pid": 7, "uid": 4242},
        ),
        "connection quota": (
            {"max_connections_per_uid": 1},
            lambda core: (join(core), core.admit(8, 1000, 1000, ())), "peer_rejected", {"pid": 8, "uid": 1000, "gid": 1000},
        ),
        "role not allowed": (
            {"rules": (only_consume,)}, attach_as("ro", "producer", size=4096), "request_refused",
            {"uid": 1000, "channel": "ro", "role": "producer", "rule": 0, "exe": "/usr/bin/peer"},
        ),
        "channel not allowed": (
            {"rules": (only_consume,)}, attach_as("other", "consumer"), "request_refused",
            {"channel": "other", "role": "consumer", "rule": 0},
        ),
        "create not allowed": (
            {"rules": (no_create,)}, attach_as("new", "producer", size=4096), "request_refused",
            {"channel": "new", "role": "producer", "rule": 0},
        ),
        "size limit": (
            {"max_segment_size": 8192}, attach_as("big", "producer", size=1 << 20), "request_refused",
            {"channel": "big", "role": "producer"},
        ),
        "status not allowed": (
            {}, lambda core: core.request(join(core), m.StatusRequest()), "request_refused", {"uid": 1000},
        ),
        "protocol error": (
            {}, lambda core: core.protocol_error(join(core), c.ProtocolError("garbage")), "request_refused", {"uid": 1000},
        ),
    }


@pytest.mark.parametrize("case", sorted(_refusals()))
def test_every_refusal_is_a_security_event_with_its_fields(case: str, caplog: pytest.LogCaptureFixture) -> None:
    kwargs, act, kind, fields = _refusals()[case]
    core, _, _ = make_core(**kwargs)
    with caplog.at_level("WARNING", logger="shmbroker._broker.events"):
        act(core)
    event = core.events.events[-1].as_dict()
    assert event["kind"] == kind
    assert {k: event[k] for k in fields} == fields
    assert core.status()["counters"][kind] == 1
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == kind]
    assert record.levelname == "WARNING"
    assert {k: record.fields[k] for k in fields} == fields  # type: ignore[attr-defined]


def test_json_logs_carry_an_events_fields_as_keys() -> None:
    import json
    import logging

    from shmbroker._broker.events import EventKind, EventLog, Who
    from shmbroker._logging import JsonFormatter

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("shmbroker._broker.events")
    logger.addHandler(handler)
    try:
        EventLog().record(EventKind.REQUEST_REFUSED, "attach: no", who=Who(pid=5, uid=6, gid=7, exe="/x", channel="c", role="consumer", rule=1))
    finally:
        logger.removeHandler(handler)
    entry = json.loads(JsonFormatter().format(records[0]))
    assert entry["event"] == "request_refused"
    assert {k: entry[k] for k in ("pid", "uid", "gid", "exe", "channel", "role", "rule")} == {
        "pid": 5, "uid": 6, "gid": 7, "exe": "/x", "channel": "c", "role": "consumer", "rule": 1,
    }


def test_a_held_attachs_fds_go_out_only_after_a_fresh_exe_check() -> None:
    """attach(wait=) answered turns later: the peer may have exec()ed another
    binary meanwhile, so the Send carrying fds asks the driver to re-verify."""
    core, _, _ = make_core()
    consumer = join(core, 2000)
    assert run(core, core.request(consumer, m.Attach(channel="later", role="consumer", wait=30.0))) == []
    producer = join(core)
    actions = run(core, core.request(producer, m.Attach(channel="later", role="producer", size=4096)))
    sends = {a.member: a for a in actions if isinstance(a, c.Send)}
    assert not sends[producer].reverify, "answered in its own turn: nothing to re-check"
    assert sends[consumer].reverify and sends[consumer].fds
    for send in sends.values():
        if send.charge is not None:
            send.charge.release()


def test_a_held_attach_that_times_out_is_closed_without_a_handshake_event() -> None:
    core, _, clock = make_core(handshake_timeout=1.0)
    consumer = join(core, 2000)
    run(core, core.request(consumer, m.Attach(channel="later", role="consumer", wait=2.0)))
    clock.now += 2.5
    actions = core.expired(clock.now)
    assert [type(a) for a in actions] == [c.Send, c.Close], actions
    assert error_code(actions[0].message) == "timeout"  # type: ignore[union-attr]
    assert not core.events.events, core.events.events


def test_refusals_cannot_use_up_the_burst_that_reports_an_exec() -> None:
    """16 refusals spend a uid's refusal burst; an identity change after them is still kept and logged."""
    core, changed, _ = make_core()
    member = join(core, 2000)
    for _ in range(core.limits.refusals_per_uid_burst + 2):
        run(core, core.request(member, m.Attach(channel="ch", role="consumer")))  # no such channel: refused
    victim = join(core, 2000)
    attach(core, victim, "ch", size=4096)
    changed[victim.identity.pid] = "pid now runs /tmp/other"
    leave(core, victim)
    kinds = [e.kind.value for e in core.events.events]
    assert kinds.count("request_refused") == core.limits.refusals_per_uid_burst
    assert "identity_changed" in kinds, kinds


# -- truncation is a peer's doing ---------------------------------------------
def _truncate_and_check(core: c.BrokerCore, channel: str) -> list[c.Action]:
    segment = core.channels[channel].segment
    assert segment is not None and segment.backend == "posix"
    os.ftruncate(segment.fd, 0)  # what a peer holding the read-write fd can do
    return run(core, core.check_segments())


def test_a_truncation_is_charged_to_the_uid_that_could_write_and_rate_limited() -> None:
    core, _, clock = make_core(refusals_per_uid_burst=3, refusal_window=10.0)
    run(core, core.panic())  # one of the broker's own events, to be kept whatever peers do
    attacker = join(core, uid=2000)
    for _ in range(5):  # each attach gets a fresh generation, truncated again
        reply = attach(core, attacker, "scratch", size=4096)
        assert isinstance(reply, m.Attached), reply
        _truncate_and_check(core, "scratch")
        assert core.check_segments() == [], "a second event for the same generation"
        leave(core, attacker)
        attacker = join(core, uid=2000)
    truncations = [e for e in core.events.events if e.kind.value == "segment_truncated"]
    assert [(e.uid, e.channel) for e in truncations] == [(2000, "scratch")] * 3
    assert all("uid 2000" in e.detail for e in truncations)
    counters = core.status()["counters"]
    assert counters["segment_truncated"] == 5 and counters["events_suppressed"] == 2
    assert [e.kind.value for e in core.events.events].count("panic_wipe") == 1
    clock.now += 11
    core.refusal_summaries(clock.now)
    assert core.events.events[-1].kind.value == "refusals_suppressed" and core.events.events[-1].uid == 2000


def test_a_truncation_of_a_shared_segment_names_every_uid_that_held_it_writable() -> None:
    core, _, _ = make_core(refusals_per_uid_burst=2, refusal_window=10.0)
    producer, consumer, bystander = join(core, uid=1000), join(core, uid=2000), join(core, uid=1000)
    attach(core, producer, "ch", size=4096)
    attach(core, consumer, "ch", role="consumer")  # posix: consumers hold the read-write fd too
    run(core, core.leave(consumer, recheck_identity=False))  # gone, but it may still hold the fd
    consumer.charge.release()
    _truncate_and_check(core, "ch")
    (event,) = core.events.events
    assert event.kind.value == "segment_truncated" and event.uid is None and event.channel == "ch"
    assert f"pid {producer.identity.pid} uid 1000" in event.detail and f"pid {consumer.identity.pid} uid 2000" in event.detail
    # Charged to both uids: uid 2000 has one event of its burst left, uid 1000 too.
    attach(core, bystander, "ch", size=4096)
    _truncate_and_check(core, "ch")
    assert [e.uid for e in core.events.events] == [None, 1000]
    assert core.refusals.limited(1000, 100.0) and not core.refusals.limited(2000, 100.0)
