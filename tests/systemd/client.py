"""A client the in-container checks (guest.py) run as another user.

Started with no SHMBROKER_SOCKET and no XDG_RUNTIME_DIR, so it has to find
the system broker by itself.  It attaches, then obeys one command per line
on stdin and answers one JSON line per command on stdout:

    write TEXT   put TEXT at the start of the segment (producers)
    read N       the first N bytes, and whether the segment is revoked
    close        detach and exit

``python client.py ROLE CHANNEL`` holds an attachment that way;
``python client.py once ROLE CHANNEL`` attaches, detaches and prints the
outcome (used to show who is refused).
"""

from __future__ import annotations

import json
import sys

from shmbroker import ShmClient, errors


def answer(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def main() -> int:
    args = sys.argv[1:]
    if args[0] == "once":
        role, channel = args[1:3]
        try:
            with ShmClient.attach(channel, role, size=1 << 20 if role == "producer" else None):
                answer(ok=True)
        except errors.ShmBrokerError as exc:
            answer(ok=False, error=type(exc).__name__, message=str(exc))
        return 0
    if args[0] == "status":
        try:
            status = ShmClient.status()
            answer(ok=True, pid=status["broker"]["pid"])
        except errors.ShmBrokerError as exc:
            answer(ok=False, error=type(exc).__name__, message=str(exc))
        return 0
    role, channel = args[:2]
    try:
        att = ShmClient.attach(channel, role, size=1 << 20 if role == "producer" else None)
    except errors.ShmBrokerError as exc:
        answer(ok=False, error=type(exc).__name__, message=str(exc))
        return 1
    answer(ok=True, generation=att.generation)
    for line in sys.stdin:
        command, _, rest = line.strip().partition(" ")
        if command == "write":
            data = rest.encode()
            att.buf[: len(data)] = data
            answer(ok=True)
        elif command == "read":
            answer(ok=True, data=bytes(att.buf[: int(rest)]).decode("latin-1"), revoked=att.revoked)
        elif command == "close":
            break
    att.close()
    answer(ok=True, closed=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
