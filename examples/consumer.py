"""Consumer: attach to a channel read-only, wait for the producer's payload,
copy it out and verify its checksum.

    python examples/consumer.py --socket PATH [--channel demo] [--timeout S]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

from shmbroker import ShmClient
from shmbroker.errors import ShmBrokerError

from producer import DATA_OFFSET, DIGEST_OFFSET, READY


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="broker socket path")
    parser.add_argument("--channel", default="demo")
    parser.add_argument("--timeout", type=float, default=30.0, help="give up after this many seconds")
    parser.add_argument("--hold", action="store_true", help="stay attached until a line arrives on stdin")
    parser.add_argument(
        "--wait", type=float, default=None, metavar="SECONDS",
        help="wait this long for the channel if it does not exist yet (default: do not wait)",
    )
    args = parser.parse_args()
    try:
        with ShmClient.attach(args.channel, "consumer", socket_path=args.socket, wait=args.wait) as att:
            print(f"consumer pid {os.getpid()}: attached, waiting for data", flush=True)
            deadline = time.monotonic() + args.timeout
            while (length := READY.unpack_from(att.buf, 0)[0]) == 0:
                att.check()  # a revoked segment reads as zeros forever: fail instead of waiting
                if time.monotonic() > deadline:
                    print("consumer: no data arrived in time", file=sys.stderr)
                    return 1
                time.sleep(0.001)
            if length > att.size - DATA_OFFSET:
                print(f"consumer: the producer announced {length} bytes, more than the segment holds", file=sys.stderr)
                return 1
            data = bytes(att.buf[DATA_OFFSET : DATA_OFFSET + length])
            digest = bytes(att.buf[DIGEST_OFFSET : DIGEST_OFFSET + 32])
            ok = hashlib.sha256(data).digest() == digest
            print(f"consumer pid {os.getpid()}: read {len(data)} bytes, checksum {'OK' if ok else 'MISMATCH'}", flush=True)
            if args.hold:
                sys.stdin.readline()
            return 0 if ok else 1
    except ShmBrokerError as exc:
        print(f"consumer: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
