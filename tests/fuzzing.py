"""Input generators for the socket-level fuzzer: random bytes, and valid
client streams mutated the way a fuzzer would (bit flips, truncation,
splices, wrong length prefixes, well-formed msgpack with wrong contents)."""

from __future__ import annotations

import random
import struct

import msgpack

from adversary import frames
from shmbroker._wire import messages as m

SEEDS = [
    frames(m.Hello()),
    frames(m.Hello(), m.Attach(channel="fuzz", role="producer", size=4096)),
    frames(m.Hello(), m.Attach(channel="fuzz", role="consumer")),
    frames(m.Hello(), m.StatusRequest()),
    frames(m.Hello(), m.Attach(channel="fuzz", role="producer", size=4096)) + frames(m.Detach())[0:0],
]
_VALUES = [None, True, False, 0, -1, 1, 2**31, 2**63, 2**64 - 1, 1.5, "", "fuzz", "x" * 5000, b"\x00", [], {}, [1, 2], {"a": 1}]
_KEYS = ["type", "version", "protocol", "channel", "role", "size", "extra", "", "fds"]
_TYPES = ["hello", "attach", "detach", "status", "welcome", "attached", "error", "bogus", ""]


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _msgpack_junk(rng: random.Random) -> bytes:
    body: dict[object, object] = {"type": rng.choice(_TYPES)}
    for _ in range(rng.randrange(5)):
        body[rng.choice(_KEYS)] = rng.choice(_VALUES)
    if rng.random() < 0.1:
        return msgpack.packb(rng.choice(_VALUES), use_bin_type=True)
    return msgpack.packb(body, use_bin_type=True)


def mutate(rng: random.Random) -> bytes:
    """One fuzz input: a byte string to send on a fresh connection."""
    kind = rng.randrange(7)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 200))
    data = bytearray(rng.choice(SEEDS))
    if kind == 1:  # bit flips
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 2:  # truncation
        del data[rng.randrange(len(data)) :]
    elif kind == 3:  # splice random bytes in
        pos = rng.randrange(len(data) + 1)
        data[pos:pos] = rng.randbytes(rng.randrange(1, 16))
    elif kind == 4:  # lie about a length
        struct.pack_into(">I", data, 0, rng.choice([0, 1, len(data), 65536, 65537, 2**31, 2**32 - 1]))
    elif kind == 5:  # a well-formed frame with nonsense inside, after a hello or not
        prefix = SEEDS[0] if rng.random() < 0.7 else b""
        data = bytearray(prefix + _frame(_msgpack_junk(rng)))
    else:  # valid requests repeated (pipelining, double hello, double attach)
        data = bytearray(b"".join(rng.choice(SEEDS) for _ in range(rng.randrange(2, 5))))
    return bytes(data)
