"""What the workers do: a one-way stream, and a ping-pong for round trips.

Every message starts with a header (sequence number, send time in
CLOCK_MONOTONIC nanoseconds) and ends with a marker byte; the consumer copies
the whole message into its own buffer, checks length, sequence and marker,
and only then counts it as delivered.
"""

from __future__ import annotations

import struct
import time
from array import array

from .peers.base import Lane
from .runner import BenchError, Ready

HEADER = struct.Struct("=QQ")  # sequence number, perf_counter_ns() at send
MIN_MESSAGE = HEADER.size
STOP = (1 << 64) - 1  # sequence number of the end-of-run message
FILL = 0xA5  # every payload byte after the header; the last one is checked
# Untimed messages before each measurement: four times the eight-message
# depth every bounded peer gets, so each slot and page of its buffers has
# been touched once and first-touch page faults are not what we time.
WARMUP = 32

# time.perf_counter_ns() is clock_gettime(CLOCK_MONOTONIC) on Linux: one
# clock for every process on the machine, so a timestamp taken by the
# producer can be subtracted from one taken by the consumer.
now = time.perf_counter_ns


def _message(size: int) -> bytearray:
    return bytearray([FILL]) * size


def _check(buf: bytearray, n: int, size: int, expect: int) -> int:
    if n != size:
        raise BenchError(f"received a {n}-byte message where {size} bytes were sent")
    seq, sent_at = HEADER.unpack_from(buf, 0)
    if seq == STOP:
        return -1
    if seq != expect:
        raise BenchError(f"message {expect} expected, got {seq}: the peer lost or reordered messages")
    if buf[size - 1] != FILL:
        raise BenchError(f"message {seq} arrived with a corrupted payload")
    return int(sent_at)


def stream_producer(ready: Ready, lane: Lane, size: int, count: int, duration_ns: int) -> None:
    sender = lane.open_sender()
    buf = _message(size)
    view = memoryview(buf)
    send = sender.send
    pack = HEADER.pack_into
    ready()
    for seq in range(WARMUP):
        pack(buf, 0, seq, now())
        send(view)
    cpu0 = time.process_time()
    t_start = now()
    seq = WARMUP
    if count:
        for seq in range(WARMUP, WARMUP + count):
            pack(buf, 0, seq, now())
            send(view)
        sent = count
    else:
        end = t_start + duration_ns
        while True:
            t = now()
            if t >= end:
                break
            pack(buf, 0, seq, t)
            send(view)
            seq += 1
        sent = seq - WARMUP
    pack(buf, 0, STOP, 0)
    send(view)
    cpu = time.process_time() - cpu0
    ready.report({"sent": sent, "t_start": t_start, "cpu_s": cpu})
    sender.close()


def stream_consumer(ready: Ready, lane: Lane, size: int) -> None:
    receiver = lane.open_receiver()
    buf = bytearray(size)
    recv_into = receiver.recv_into
    ready()
    for expect in range(WARMUP):
        if _check(buf, recv_into(buf), size, expect) < 0:
            raise BenchError("the stream ended during its warm-up")
    # Messages of the warm-up still in flight are received inside the timed
    # window and not counted: an error of at most the peer's depth, against
    # the peer, the same for every peer.
    cpu0 = time.process_time()
    expect = WARMUP
    while _check(buf, recv_into(buf), size, expect) >= 0:
        expect += 1
    t_end = now()
    cpu = time.process_time() - cpu0
    ready.report({"received": expect - WARMUP, "t_end": t_end, "cpu_s": cpu})
    receiver.close()


def pinger(ready: Ready, fwd: Lane, back: Lane, size: int, samples: int, warmup: int) -> None:
    sender = fwd.open_sender()
    receiver = back.open_receiver()
    out = _message(size)
    view = memoryview(out)
    inbuf = bytearray(size)
    rtt = array("q")
    ready()
    for i in range(warmup + samples):
        t0 = now()
        HEADER.pack_into(out, 0, i, t0)
        sender.send(view)
        n = receiver.recv_into(inbuf)
        t1 = now()
        if _check(inbuf, n, size, i) != t0:
            raise BenchError(f"round trip {i} came back with another message's timestamp")
        if i >= warmup:
            rtt.append(t1 - t0)
    HEADER.pack_into(out, 0, STOP, 0)
    sender.send(view)
    ready.report({"rtt_ns": rtt.tobytes()})
    sender.close()
    receiver.close()


def echo(ready: Ready, fwd: Lane, back: Lane, size: int, warmup: int) -> None:
    receiver = fwd.open_receiver()
    sender = back.open_sender()
    buf = bytearray(size)
    view = memoryview(buf)
    oneway = array("q")
    ready()
    expect = 0
    while True:
        n = receiver.recv_into(buf)
        t = now()
        sent_at = _check(buf, n, size, expect)
        if sent_at < 0:
            break
        if expect >= warmup:
            oneway.append(t - sent_at)
        expect += 1
        sender.send(view)
    ready.report({"oneway_ns": oneway.tobytes()})
    sender.close()
    receiver.close()


def samples(raw: bytes) -> list[int]:
    values = array("q")
    values.frombytes(raw)
    return values.tolist()
