"""Per-uid quotas as charges: whoever holds a resource holds its charge, and
releasing the holder releases the charge, exactly once.

Every resource a peer can make the broker hold is charged to a uid: its
connections, the segments and bytes it created, and the broker's file
descriptors it pins (its socket and pidfd, the segment and ring fds of what
it created, a ring consumer's cursor page, and the fds of a reply until the
peer has read it: SCM_RIGHTS in flight are charged by the kernel to the
broker's user, see unix(7) ETOOMANYREFS).  Totals across all uids are capped
too, so no mix of uids can drive the broker into EMFILE: a full table is a
``LimitExceeded`` refusal for the newcomer, never a failure for those
already served.
"""

from __future__ import annotations

import collections
import enum

from ..errors import LimitExceeded


class Resource(str, enum.Enum):
    CONNECTIONS = "connections"
    SEGMENTS = "segments"
    BYTES = "bytes"
    FDS = "fds"


class Ledger:
    """What each uid holds, checked against per-uid and total caps."""

    def __init__(self, per_uid: dict[Resource, int], total: dict[Resource, int]) -> None:
        self.per_uid = dict(per_uid)
        self.total = dict(total)
        self._used: dict[int, collections.Counter[Resource]] = {}
        self._total_used: collections.Counter[Resource] = collections.Counter()

    def used(self, uid: int, resource: Resource) -> int:
        counter = self._used.get(uid)
        return counter[resource] if counter is not None else 0

    def total_used(self, resource: Resource) -> int:
        return self._total_used[resource]

    def charge(self, uid: int, **amounts: int) -> Charge:
        """A new charge of ``amounts`` (keyword per Resource value) to ``uid``;
        raises LimitExceeded, charging nothing, if any cap would be passed."""
        charge = Charge(self, uid)
        charge.add(**amounts)
        return charge

    def _check(self, uid: int, wanted: dict[Resource, int]) -> None:
        for resource, amount in wanted.items():
            if amount <= 0:
                continue
            used = self.used(uid, resource)
            limit = self.per_uid.get(resource)
            if limit is not None and used + amount > limit:
                raise LimitExceeded(_per_uid_message(resource, uid, used, amount, limit))
            total_limit = self.total.get(resource)
            if total_limit is not None and self._total_used[resource] + amount > total_limit:
                raise LimitExceeded(_total_message(resource, self._total_used[resource], total_limit))

    def _apply(self, uid: int, amounts: dict[Resource, int], sign: int) -> None:
        counter = self._used.setdefault(uid, collections.Counter())
        for resource, amount in amounts.items():
            counter[resource] += sign * amount
            self._total_used[resource] += sign * amount
        if not +counter:
            del self._used[uid]


class Charge:
    """Resources held on behalf of one uid; :meth:`release` gives them back once."""

    __slots__ = ("_ledger", "uid", "_held")

    def __init__(self, ledger: Ledger, uid: int) -> None:
        self._ledger = ledger
        self.uid = uid
        self._held: collections.Counter[Resource] = collections.Counter()

    def held(self, resource: Resource) -> int:
        return self._held[resource]

    def add(self, **amounts: int) -> None:
        """Charge more to the same holder; LimitExceeded (and nothing charged) past a cap."""
        wanted = {Resource(name): amount for name, amount in amounts.items() if amount}
        self._ledger._check(self.uid, wanted)
        self._ledger._apply(self.uid, wanted, +1)
        self._held.update(wanted)

    def release(self) -> None:
        if self._held:
            self._ledger._apply(self.uid, dict(self._held), -1)
            self._held.clear()


_PER_UID_KEYS = {
    Resource.CONNECTIONS: "max_connections_per_uid",
    Resource.SEGMENTS: "max_segments_per_uid",
    Resource.BYTES: "max_bytes_per_uid",
    Resource.FDS: "max_fds_per_uid",
}


def _per_uid_message(resource: Resource, uid: int, used: int, amount: int, limit: int) -> str:
    key = _PER_UID_KEYS[resource]
    if resource is Resource.CONNECTIONS:
        return f"uid {uid} already has {used} connections (limit {limit}, {key})"
    if resource is Resource.SEGMENTS:
        return f"uid {uid} already owns {used} channels (limit {limit}, {key}); close some first"
    if resource is Resource.BYTES:
        return f"uid {uid} would own {used + amount} bytes of segments, over {key} ({limit})"
    return (
        f"uid {uid} would hold {used + amount} of the broker's file descriptors, over {key} ({limit}); "
        "close some attachments first"
    )


def _total_message(resource: Resource, used: int, limit: int) -> str:
    if resource is Resource.CONNECTIONS:
        return f"broker is at its connection limit ({limit}); try again later (max_connections)"
    if resource is Resource.FDS:
        return (
            f"broker is out of file descriptors ({used} of the {limit} it may use are taken); try again later, "
            "or raise its RLIMIT_NOFILE (LimitNOFILE= in the unit)"
        )
    return f"broker is at its total {resource.value} limit ({limit}); try again later"
