#!/usr/bin/env python3
"""Consumer of the README's quickstart: print every message of a ring
channel as it arrives, until Ctrl-C (or --count messages).

    python examples/ring_consumer.py [--channel events] [--socket PATH] [--count N]

Start it before or after the producer: a channel the broker declared
(`--channel events:1MiB:ring`) exists as soon as the broker runs.
"""

from __future__ import annotations

import argparse
import sys

from shmbroker import ShmClient
from shmbroker.errors import ShmBrokerError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channel", default="events", help="ring channel (default: events)")
    parser.add_argument("--socket", help="the broker's socket (default: the standard path)")
    parser.add_argument("--count", type=int, help="exit after this many messages (default: run until Ctrl-C)")
    parser.add_argument(
        "--wait", type=float, default=None, metavar="SECONDS",
        help="if the channel does not exist yet, or has no producer, wait this long for them "
        "(default: attach at once; a channel the broker declares can be joined before its producer)",
    )
    args = parser.parse_args()
    try:
        with ShmClient.attach(args.channel, "consumer", socket_path=args.socket, wait=args.wait) as consumer:
            print(f"consumer: attached to {consumer.channel!r}, waiting for messages", flush=True)
            received = 0
            while args.count is None or received < args.count:
                message = consumer.recv()  # sleeps on an eventfd until the producer sends
                print(f"consumer: {message.decode(errors='replace')}", flush=True)
                received += 1
    except ShmBrokerError as exc:
        print(f"consumer: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
