#!/usr/bin/env python3
"""One asyncio event loop consuming two ring channels at once.

Start a broker (`shmbroker serve`), then run this script: it creates two
ring channels as producer (in a forked child), and consumes both from one
event loop with `recv_async`, which waits on the channels' eventfds through
loop.add_reader and never blocks the loop.

    python examples/async_consumer.py [--socket PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from shmbroker import Attachment, ShmClient, errors

CHANNELS = ("sensors", "commands")
COUNT = 5


def produce(socket_path: str | None, ready_fd: int) -> None:
    """Child: one producer per channel, a few messages each, slowly."""
    producers = [
        ShmClient.attach(name, "producer", socket_path=socket_path, size=1 << 16, ring=True, max_message=1024)
        for name in CHANNELS
    ]
    os.write(ready_fd, b"x")
    time.sleep(0.2)  # give the consumers time to attach (messages sent before are kept for the first one)
    for i in range(COUNT):
        for name, p in zip(CHANNELS, producers):
            p.send(f"{name} #{i}".encode())
        time.sleep(0.05)
    time.sleep(0.5)  # keep the channels alive until the consumers are done
    for p in producers:
        p.close()


async def consume(att: Attachment, name: str) -> None:
    for _ in range(COUNT):
        message = await att.recv_async(timeout=5)
        print(f"[{name}] {message.decode()}")


async def main(socket_path: str | None) -> None:
    consumers = [ShmClient.attach(name, "consumer", socket_path=socket_path) for name in CHANNELS]
    try:
        await asyncio.gather(*(consume(c, n) for c, n in zip(consumers, CHANNELS)))
    finally:
        for c in consumers:
            c.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", help="the broker's socket (default: the standard path)")
    args = parser.parse_args()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            produce(args.socket, w)
        finally:
            os._exit(0)
    os.close(w)
    if not os.read(r, 1):
        raise SystemExit("the producer could not create the channels (is a broker running?)")
    try:
        asyncio.run(main(args.socket))
    except errors.ShmBrokerError as exc:
        raise SystemExit(f"error: {exc}") from None
    finally:
        os.waitpid(pid, 0)
