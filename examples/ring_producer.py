#!/usr/bin/env python3
"""Producer of the README's quickstart: send each argument (or each line of
stdin) as one message on a ring channel.

    python examples/ring_producer.py [--channel events] [--socket PATH] [MESSAGE ...]

The channel must exist: start the broker with `--channel events:1MiB:ring`.
"""

from __future__ import annotations

import argparse
import sys

from shmbroker import ShmClient
from shmbroker.errors import ShmBrokerError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("messages", nargs="*", metavar="MESSAGE", help="messages to send (default: the lines of stdin)")
    parser.add_argument("--channel", default="events", help="ring channel (default: events)")
    parser.add_argument("--socket", help="the broker's socket (default: the standard path)")
    args = parser.parse_args()
    try:
        with ShmClient.attach(args.channel, "producer", socket_path=args.socket) as producer:
            messages = args.messages or (line.rstrip("\n") for line in sys.stdin)
            sent = 0
            for text in messages:
                producer.send(text.encode())  # blocks while the ring is full
                sent += 1
            print(f"producer: sent {sent} message(s) on {producer.channel!r}")
    except ShmBrokerError as exc:
        print(f"producer: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
