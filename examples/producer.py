"""Producer: attach to a channel, write a payload and its checksum into the
segment, then publish it by setting a flag word.

    python examples/producer.py --socket PATH [--channel demo] [--bytes N]

Raw channels give you the mapping and nothing else; this example uses the
simplest layout that is still correct on x86-64: payload first, then one
aligned 8-byte store of the length, which the consumer polls.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import sys

from shmbroker import ShmClient
from shmbroker.errors import ShmBrokerError

# Layout of this example inside the payload area.
READY = struct.Struct("<Q")  # offset 0: payload length once published, 0 before
DIGEST_OFFSET = 8  # 32 bytes of sha256
DATA_OFFSET = 64


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="broker socket path")
    parser.add_argument("--channel", default="demo")
    parser.add_argument("--bytes", type=int, default=1 << 20, help="payload size (default 1 MiB)")
    parser.add_argument("--hold", action="store_true", help="stay attached until a line arrives on stdin")
    args = parser.parse_args()
    try:
        with ShmClient.attach(args.channel, "producer", socket_path=args.socket) as att:
            if args.bytes > att.size - DATA_OFFSET:
                print(f"producer: {args.bytes} bytes do not fit in the {att.size}-byte segment", file=sys.stderr)
                return 1
            payload = os.urandom(args.bytes)
            att.buf[DATA_OFFSET : DATA_OFFSET + len(payload)] = payload
            att.buf[DIGEST_OFFSET : DIGEST_OFFSET + 32] = hashlib.sha256(payload).digest()
            READY.pack_into(att.buf, 0, len(payload))  # publish last
            print(f"producer pid {os.getpid()}: wrote {len(payload)} bytes, sha256 {hashlib.sha256(payload).hexdigest()[:16]}...", flush=True)
            # The broker wipes a segment when its last peer detaches: without
            # --hold, attach a consumer first or the payload is gone with us.
            if args.hold:
                sys.stdin.readline()
    except ShmBrokerError as exc:
        print(f"producer: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
