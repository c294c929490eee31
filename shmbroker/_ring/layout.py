"""Byte layout of a ring: pages in memfds of their own, data in the segment's payload.

Besides its segment, a ring has one-page memfds, each sealed against
resizing and of mode 0 (the broker creates them all, _ring/broker.py):

* the **index page** holds everything only the producer (and the broker,
  through pwrite) writes: the static header, the write index, LOW, the
  reserve index, the producer-waiting flag, the membership with its
  generation, and each slot's attach serial and start index.  The
  producer maps it read-write; consumers get an O_RDONLY reopen of it and
  map it read-only, so no consumer can forge an index another consumer
  trusts (docs/attacks.md, A6);
* the **control page** holds the consumers' sleeping flags.  Every peer
  maps it read-write, so a consumer can clear another's flag: that only
  delays the other's wake-up to its periodic re-check (waiting.py);
* a **cursor page** per consumer attachment holds that consumer's read
  index (word 0).  The broker makes a fresh one for every attach, so only
  that consumer (read-write), the broker and the ring's producer
  (read-only, fetched from the broker on demand) ever hold it: no other
  consumer, not even an earlier occupant of the same slot, can move it.
  The producer trusts the page whose serial matches the slot's attach
  serial in the index page, and until it has that page bounds itself by
  the slot's start index, which the consumer's cursor never goes below.

Both live outside the segment, so consumers map the segment read-only and
can never change a message.  The data area is the whole payload from
offset 0 (segment offset HEADER_SIZE, so it is page-aligned), rounded down
to ALIGN; the segment header keeps the revoked word, which peers only read.

Every word is a little-endian, naturally aligned u64; words written by
different parties sit on different 64-byte cache lines so peers do not
false-share.

Index page:

    offset     size  writer     field
    0          8     broker     magic b"SHMRING\\x01"
    8          4     broker     ring layout version
    12         4     broker     max consumers (slots)
    16         8     broker     data offset in the payload (0)
    24         8     broker     data size (bytes, multiple of 8)
    32         8     broker     max message (bytes)
    64         8     producer   write index (monotonic byte count, published last)
    72         8     producer   low: oldest index still retained for a consumer joining an empty ring
    80         8     producer   producer waiting for space (non-zero while it sleeps)
    88         8     producer   reserve: the producer writes no data at or beyond this index
    128        8     broker     membership: byte k non-zero while slot k belongs to a consumer
    136        8     broker     membership generation: +1 on every consumer attach and detach,
                                stored after the words it covers
    192+16k    8     broker     attach serial of slot k (non-zero, unique per ring; 0: never attached)
    200+16k    8     broker     start index of slot k's consumer (its cursor never goes below it)

Control page:

    offset     size  writer     field
    0          8     consumers  sleeping: byte k non-zero while consumer k sleeps

Cursor page (one per consumer attachment):

    offset     size  writer     field
    0          8     consumer   read index of that consumer (the broker stores its start first)

The reserve index is what lets a consumer trust what it copied: the
producer stores reserve = w + rec before it writes any byte of a record at
indices [w, w + rec), and index x lives at x % data size, so a copy of
[r, r + len) is intact if reserve <= r + data size once the copy is done
(docs/ring.md, "robustness").

Records in the data area are 8-byte aligned and never wrap: an 8-byte
record header (u32 length, u32 kind) followed by the message, padded to 8.
When a record does not fit before the end of the area, the producer
publishes a PAD record that covers the rest of the area.
"""

from __future__ import annotations

import struct
import sys

from ..limits import PAGE_SIZE

RING_MAGIC = b"SHMRING\x01"
# 2: the control page moved out of the segment into its own memfd.
# 3: what only the producer writes moved to the read-only-for-consumers index
#    page, with a new reserve index.
# 4: cursors moved out of the shared control page into a fresh page per
#    consumer attachment; the index page gained the membership generation
#    and per-slot attach serials and start indices.
RING_VERSION = 4
# Eight consumer slots.  Precedent: iceoryx2's default max-subscribers per
# publish-subscribe service is 8 (config/iceoryx2.toml).  Reason here: one
# u64 holds one membership byte and one sleeping byte per slot, so the
# producer learns who sleeps with a single aligned load per send, and the
# producer's fd set (the segment, two pages, 1 + 8 eventfds) and a reply
# with every consumer's cursor page (8) fit the protocol's 16-fd list.
MAX_CONSUMERS = 8
CONTROL_SIZE = PAGE_SIZE
INDEX_SIZE = PAGE_SIZE
CURSOR_SIZE = PAGE_SIZE
# Where the data area starts in the payload.  The control page has its own
# object, so nothing precedes the data; kept as a name (and in the static
# header) so a reader checks rather than assumes it.
DATA_OFFSET = 0
RECORD_HEADER = 8
ALIGN = 8
# A ring must hold at least a few pages of data to be useful.
MIN_DATA_SIZE = PAGE_SIZE
# A record's length is a 32-bit field, and a PAD covers the rest of the
# area up to its end: an area larger than this could need a PAD whose
# length does not fit.
MAX_DATA_SIZE = 1 << 32
KIND_MSG = 1
KIND_PAD = 2
# u32 length field; beyond this messages belong in a raw channel anyway.
MAX_MESSAGE_LIMIT = 2**31

# Index page.
OFF_MAGIC = 0
OFF_DATA_SIZE = 24
OFF_MAX_MESSAGE = 32
OFF_WRITE = 64
OFF_LOW = 72
OFF_PRODUCER_WAITING = 80
OFF_RESERVE = 88
OFF_MEMBERS = 128
OFF_MEMBER_GEN = 136
OFF_SLOT_INFO = 192
SLOT_INFO_STRIDE = 16
# Control page.
OFF_SLEEPING = 0
# Cursor page.
OFF_CURSOR = 0

U64 = struct.Struct("<Q")
RECORD = struct.Struct("<II")
_STATIC = struct.Struct("<8sIIQQQ")

assert OFF_SLOT_INFO + MAX_CONSUMERS * SLOT_INFO_STRIDE <= INDEX_SIZE


def serial_offset(slot: int) -> int:
    """Index-page offset of slot k's attach serial."""
    return OFF_SLOT_INFO + slot * SLOT_INFO_STRIDE


def start_offset(slot: int) -> int:
    """Index-page offset of slot k's start index."""
    return OFF_SLOT_INFO + slot * SLOT_INFO_STRIDE + 8


def align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def data_size_for(payload_size: int) -> int:
    return (payload_size - DATA_OFFSET) & ~(ALIGN - 1)


def check_geometry(payload_size: int, max_message: int) -> str | None:
    """Why a ring of this payload size cannot carry messages of max_message bytes, or None."""
    if max_message <= 0 or max_message > MAX_MESSAGE_LIMIT:
        return f"max_message must be between 1 and {MAX_MESSAGE_LIMIT} bytes"
    data = data_size_for(payload_size)
    if data < MIN_DATA_SIZE:
        return f"a ring needs a payload of at least {DATA_OFFSET + MIN_DATA_SIZE} bytes of data"
    if data > MAX_DATA_SIZE:
        return f"a ring's data area holds at most {MAX_DATA_SIZE} bytes (4 GiB; record lengths are 32-bit): use a smaller size"
    if RECORD_HEADER + align(max_message) > data:
        return (
            f"max_message {max_message} does not fit the ring's {data}-byte data area; "
            "use a larger size (several times max_message keeps the producer from waiting)"
        )
    return None


def init_image(payload_size: int, max_message: int) -> bytes:
    """The index page the broker pwrite()s into a fresh index memfd."""
    image = bytearray(INDEX_SIZE)
    _STATIC.pack_into(
        image, 0, RING_MAGIC, RING_VERSION, MAX_CONSUMERS, DATA_OFFSET, data_size_for(payload_size), max_message
    )
    return bytes(image)


def parse_static(buf: bytes | memoryview) -> tuple[int, int] | None:
    """(data_size, max_message) from an index page, or None if it is not a ring."""
    magic, version, slots, data_offset, data_size, max_message = _STATIC.unpack_from(buf, 0)
    if magic != RING_MAGIC or version != RING_VERSION or slots != MAX_CONSUMERS or data_offset != DATA_OFFSET:
        return None
    return data_size, max_message


# Default largest message when a ring channel does not say: 64 KiB, the
# default maximum of a Linux pipe's buffer and of a UDP datagram, or a
# quarter of the data area for small rings so several messages fit.
DEFAULT_MAX_MESSAGE = 64 * 1024


def default_max_message(payload_size: int, requested: int | None) -> int:
    if requested is not None:
        return requested
    quarter = (data_size_for(payload_size) // 4 - RECORD_HEADER) & ~(ALIGN - 1)
    return max(1, min(DEFAULT_MAX_MESSAGE, quarter))


def resolve_max_message(payload_size: int, requested: int | None) -> int:
    """The max_message a ring of this size gets (the default when None);
    ValueError saying why when the pair cannot work.  Every place that
    creates a ring channel (config, --channel, attach) goes through here."""
    max_message = default_max_message(payload_size, requested)
    problem = check_geometry(payload_size, max_message)
    if problem:
        raise ValueError(problem)
    return max_message


# Peers access shared words as native u64 items (see ring.py), which equal
# the little-endian layout only on little-endian hosts.
if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("shmbroker's message ring supports little-endian hosts only")


# Names of the fds in the Attached message, in SCM_RIGHTS order after
# "segment": part of the protocol, which broker and client both speak.
CONTROL_FD = "ring.control"
INDEX_FD = "ring.index"
CURSOR_FD = "ring.cursor"
PRODUCER_FD = "ring.producer"
CONSUMER_FD = "ring.consumer"


def consumer_fd_name(slot: int) -> str:
    return f"{CONSUMER_FD}{slot}"


def producer_fd_names() -> tuple[str, ...]:
    return (CONTROL_FD, INDEX_FD, PRODUCER_FD, *(consumer_fd_name(k) for k in range(MAX_CONSUMERS)))


CONSUMER_FD_NAMES = (CONTROL_FD, INDEX_FD, CURSOR_FD, CONSUMER_FD, PRODUCER_FD)
