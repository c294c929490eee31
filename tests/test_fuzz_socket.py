"""Socket-level fuzzing of a live broker: random and mutated client streams.

The quick run is part of the default suite; the long one (``make test-long``)
sends many more.  Either way: the broker stays up, leaks no fd, never hands
a segment to a malformed conversation's victim, and an attached client is
not affected."""

from __future__ import annotations

import os
import random
import socket
from typing import Any

import pytest

from adversary import stable_fd_count, wait_fd_baseline
from fuzzing import mutate
from shmbroker import ShmClient

LONG_INPUTS = int(os.environ.get("SHMBROKER_FUZZ_INPUTS", "20000"))


def _fuzz(broker: Any, inputs: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    bystander = ShmClient.attach("bystander", size=4096, socket_path=broker.socket)
    bystander.buf[:5] = b"alive"
    baseline = stable_fd_count(broker.pid)
    stats = {"inputs": 0, "replies_with_fds": 0}
    try:
        for i in range(inputs):
            data = mutate(rng)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(broker.socket)
                try:
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                    while True:
                        msg, anc, _, _ = s.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
                        for _, _, fds in anc:
                            stats["replies_with_fds"] += 1
                            for j in range(0, len(fds) - len(fds) % 4, 4):
                                os.close(int.from_bytes(fds[j : j + 4], "little"))
                        if not msg:
                            break
                except (BrokenPipeError, ConnectionResetError):
                    pass
            stats["inputs"] += 1
            if i % 500 == 499:
                assert broker.proc.poll() is None, f"broker died after input {i}: {data!r}"
        assert broker.proc.poll() is None
        wait_fd_baseline(broker.pid, baseline)
        assert not bystander.revoked and bytes(bystander.buf[:5]) == b"alive"
        with ShmClient.attach("bystander", role="consumer", socket_path=broker.socket) as att:
            assert bytes(att.buf[:5]) == b"alive"
    finally:
        bystander.close()
    assert "Traceback" not in broker.log.read_text(), "the broker logged an internal error"
    return stats


def test_socket_fuzz_quick(broker: Any) -> None:
    stats = _fuzz(broker, 400, seed=1)
    assert stats["inputs"] == 400


@pytest.mark.long
def test_socket_fuzz_long(broker: Any) -> None:
    stats = _fuzz(broker, LONG_INPUTS, seed=int(os.environ.get("SHMBROKER_FUZZ_SEED", "2")))
    print(f"\nsocket fuzz: {stats['inputs']} inputs, {stats['replies_with_fds']} valid attaches among them")
