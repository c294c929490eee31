"""Helpers for ring tests: forked workers and checksummed, numbered messages."""

from __future__ import annotations

import os
import pickle
import random
import signal
import struct
import time
import traceback
import zlib
from collections.abc import Callable
from typing import Any

# epoch (which producer incarnation), sequence number, crc32 of the body
HEAD = struct.Struct("<IQI")


def make_message(epoch: int, seq: int, rng: random.Random, max_size: int) -> bytes:
    body = rng.randbytes(rng.randint(0, max_size - HEAD.size))
    return HEAD.pack(epoch, seq, zlib.crc32(body)) + body


def check_message(data: bytes) -> tuple[int, int]:
    epoch, seq, crc = HEAD.unpack_from(data)
    if zlib.crc32(data[HEAD.size :]) != crc:
        raise AssertionError(f"message {epoch}/{seq} of {len(data)} bytes fails its checksum (torn or corrupt)")
    return epoch, seq


class Worker:
    """A forked child running ``fn``; its return value (or exception) comes back pickled."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                result: Any = ("ok", fn())
            except BaseException as exc:
                result = ("err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            with os.fdopen(w, "wb") as f:
                f.write(pickle.dumps(result))
            os._exit(0)
        os.close(w)
        self.pid = pid
        self._r = r
        self.status: int | None = None

    def kill(self) -> None:
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            self.join(10)

    def join(self, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while self.status is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.status = status
                break
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                os.close(self._r)
                raise AssertionError(f"worker {self.pid} did not finish within {timeout}s (wedged?)")
            time.sleep(0.01)
        with os.fdopen(self._r, "rb") as f:
            data = f.read()
        if not data:
            return None  # killed
        result = pickle.loads(data)
        if result[0] == "err":
            raise AssertionError(f"worker {self.pid} failed: {result[1]}")
        return result[1]
