"""`shmbroker bench`: shmbroker and the IPC mechanisms users would pick
instead, measured side by side in one run on this machine.

Private: the command line is the interface; the JSON schema is documented
in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__, errors
from .peers import PEER_NAMES, load

if TYPE_CHECKING:
    from .peers import Peer
    from .progress import Progress

# The timing header every message starts with (workloads.HEADER); kept here
# so parsing arguments does not import the workers' machinery.
MIN_MESSAGE = 16

DEFAULT_SIZES = (64, 4096, 65536, 1048576)
# Largest message: the bench holds several in flight per lane, in every peer.
MAX_SIZE = 64 * 1024 * 1024
# One process per producer and per consumer; more than this only measures
# the scheduler on any machine this runs on.
MAX_LANES = 64

# Full runs: long enough for a steady state, short enough to run by hand.
FULL_DURATION_S = 1.0
FULL_ROUND_TRIPS = 5000
FULL_ROUND_TRIP_BYTES = 2 << 30  # fewer round trips of big messages
FULL_ATTACHES = 2000
FULL_CHURN_S = 2.0
FULL_CEILING_S = 0.2
# --quick: a CI smoke run in seconds; its figures are indicative only.
QUICK_MESSAGES = 2000
QUICK_BYTES = 64 << 20
QUICK_ROUND_TRIPS = 200
QUICK_ROUND_TRIP_BYTES = 16 << 20
QUICK_ATTACHES = 100
QUICK_CHURN_S = 0.3
QUICK_CEILING_S = 0.01
MIN_MESSAGES = 20  # a size's floor however big its messages
# Untimed round trips first; as for the stream warm-up (workloads.WARMUP),
# enough to touch every buffer slot of every peer once.
WARMUP_TRIPS = 32
# Clients attaching at once in the attach-rate figure: four per core on a
# 2-core machine, enough that the broker, not the clients, is the bottleneck.
ATTACH_CLIENTS = 8


def _sizes(text: str) -> list[int]:
    from .._broker.config import parse_size

    sizes: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            size = parse_size(part)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{part!r}: {exc}") from None
        if not MIN_MESSAGE <= size <= MAX_SIZE:
            raise argparse.ArgumentTypeError(
                f"{part!r}: message sizes must be {MIN_MESSAGE} bytes (the timing header) to {MAX_SIZE // (1 << 20)} MiB"
            )
        if size not in sizes:
            sizes.append(size)
    if not sizes:
        raise argparse.ArgumentTypeError("give at least one size, e.g. 64,4096")
    return sorted(sizes)


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be greater than zero")
        return value

    return parse


def _peer_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer {unknown[0]!r} (known: {', '.join(PEER_NAMES)})")
    if not names:
        raise argparse.ArgumentTypeError(f"give at least one peer (known: {', '.join(PEER_NAMES)})")
    return list(dict.fromkeys(names))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=_sizes, default=list(DEFAULT_SIZES), metavar="LIST", help="message sizes in bytes, comma separated; K/M suffixes allowed (default: 64,4096,65536,1048576)")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--messages", type=_positive(int), metavar="N", help="messages per producer for each throughput figure")
    amount.add_argument("--duration", type=_positive(float), metavar="S", help=f"seconds per throughput figure (default: {FULL_DURATION_S:g})")
    parser.add_argument("--producers", type=_positive(int), default=1, metavar="P", help="producer processes (default: 1)")
    parser.add_argument("--consumers", type=_positive(int), default=1, metavar="C", help="consumer processes; must equal --producers: each producer streams to its own consumer (default: 1)")
    parser.add_argument("--peers", type=_peer_list, metavar="LIST", help=f"peers to run, comma separated (default: all: {','.join(PEER_NAMES)})")
    parser.add_argument("--json", metavar="FILE", help="write every figure and the machine description as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="draw throughput and latency per size (needs matplotlib)")
    parser.add_argument("--quick", action="store_true", help="a smoke run that finishes in seconds (CI); figures are indicative only")
    parser.add_argument("--list-peers", action="store_true", help="list the peers, whether each can run here, and exit")


def _bad(message: str) -> None:
    # ConfigError: the CLI prints it without a traceback and exits 2, as for
    # any other bad argument.
    raise errors.ConfigError(message)


def _check_args(args: argparse.Namespace) -> None:
    if args.producers != args.consumers:
        _bad(
            f"--producers {args.producers} and --consumers {args.consumers} differ: each producer streams to its own "
            "consumer (one lane per pair), so give the same number for both"
        )
    if args.producers > MAX_LANES:
        _bad(f"--producers {args.producers}: at most {MAX_LANES} producer/consumer pairs")
    if args.plot and not args.plot.lower().endswith(".png"):
        _bad(f"--plot {args.plot}: the plot is a PNG; give a file name ending in .png")
    if args.plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            _bad("--plot needs matplotlib: pip install 'shmbroker[bench]' (or leave out --plot)")
    for option in ("json", "plot"):
        path = getattr(args, option)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            _bad(f"--{option} {path}: directory {os.path.dirname(os.path.abspath(path))} does not exist")


def _list_peers() -> int:
    for name in PEER_NAMES:
        peer = load(name)()
        reason = peer.available()
        print(f"{name:<14} {'ok' if reason is None else 'skipped: ' + reason}")
        print(f"{'':<14} {peer.description}")
    return 0


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        "quick": quick,
        "messages": args.messages if args.messages else (QUICK_MESSAGES if quick and not args.duration else 0),
        "duration_s": args.duration if args.duration else (0.0 if (quick or args.messages) else FULL_DURATION_S),
        "byte_budget": QUICK_BYTES if quick else 1 << 62,
        "round_trips": QUICK_ROUND_TRIPS if quick else FULL_ROUND_TRIPS,
        "round_trip_bytes": QUICK_ROUND_TRIP_BYTES if quick else FULL_ROUND_TRIP_BYTES,
        "attaches": QUICK_ATTACHES if quick else FULL_ATTACHES,
        "churn_s": QUICK_CHURN_S if quick else FULL_CHURN_S,
        "ceiling_s": QUICK_CEILING_S if quick else FULL_CEILING_S,
    }


def _remove_shm(tag: str) -> list[str]:
    """Remove what this run left in /dev/shm (names carry the run's tag)."""
    removed: list[str] = []
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return removed
    for name in names:
        if name.startswith(tag):
            try:
                os.unlink(os.path.join("/dev/shm", name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


_STALE = re.compile(r"shmbench-?(\d+)[_-]")


def _remove_stale() -> list[str]:
    """Leftovers of runs killed with -9 (the one way to skip our cleanup).

    Names carry the harness's pid; a name whose pid no longer exists is
    stale.  A reused pid only makes us keep a leftover, never remove a live
    run's files.
    """
    removed: list[str] = []
    for directory in ("/dev/shm", "/tmp"):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            match = _STALE.match(name)
            if not match or os.path.exists(f"/proc/{match.group(1)}"):
                continue
            path = os.path.join(directory, name)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def _run_peer(peer: Peer, sizes: list[int], plan: dict[str, Any], lanes: int, progress: Progress) -> dict[str, Any]:
    from . import measure
    from .runner import BenchError

    entry: dict[str, Any] = {"description": peer.description, "status": "ok", "sizes": []}
    for size in sizes:
        figures: dict[str, Any] = {"size": size}
        try:
            progress.step(f"{peer.name} {size} B throughput")
            messages = 0
            if plan["messages"]:
                # --quick caps the bytes per size; a count given by hand is used as is.
                messages = min(plan["messages"], max(MIN_MESSAGES, plan["byte_budget"] // size))
            figures["throughput"] = measure.throughput(peer, size, lanes, messages, plan["duration_s"])
            progress.advance()
            progress.step(f"{peer.name} {size} B latency")
            trips = max(MIN_MESSAGES, min(plan["round_trips"], plan["round_trip_bytes"] // size))
            figures["latency"] = measure.latency(peer, size, trips, max(WARMUP_TRIPS, trips // 10))
            progress.advance()
        except BenchError as exc:
            figures["error"] = str(exc)
            entry["status"] = "failed"
            progress.advance()
        entry["sizes"].append(figures)
    return entry


def _ratios(peers: dict[str, Any]) -> dict[str, Any]:
    """shmbroker's figures over each peer's, per size (>1: shmbroker is better).

    A figure a side lacks (its measurement failed) has no ratio.
    """
    ours = {f["size"]: f for f in peers.get("shmbroker", {}).get("sizes", [])}
    ratios: dict[str, Any] = {}
    for name, entry in peers.items():
        if name == "shmbroker":
            continue
        rows = []
        for f in entry.get("sizes", []):
            mine = ours.get(f["size"])
            if mine is None:
                continue
            row: dict[str, Any] = {"size": f["size"]}
            if "throughput" in f and "throughput" in mine:
                row["throughput"] = mine["throughput"]["msgs_per_s"] / f["throughput"]["msgs_per_s"]
                if mine["throughput"]["cpu_s_per_msg"] > 0:  # 0 only below the clock's resolution
                    row["cpu_per_msg"] = f["throughput"]["cpu_s_per_msg"] / mine["throughput"]["cpu_s_per_msg"]
            if "latency" in f and "latency" in mine:
                row["round_trip_p50"] = f["latency"]["round_trip_us"]["p50"] / mine["latency"]["round_trip_us"]["p50"]
            if len(row) > 1:
                rows.append(row)
        if rows:
            ratios[name] = rows
    return ratios


def run(args: argparse.Namespace) -> int:
    from . import ceiling, jsonout, machine, table, workloads
    from .peers import RunContext
    from .progress import Progress

    assert workloads.HEADER.size == MIN_MESSAGE
    if args.list_peers:
        return _list_peers()
    _check_args(args)

    names = args.peers or list(PEER_NAMES)
    plan = _plan(args)
    lanes = args.producers
    started = time.time()
    report: dict[str, Any] = {
        "schema": jsonout.SCHEMA,
        "shmbroker_version": __version__,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": machine.describe(),
        "config": {
            "sizes": args.sizes,
            "messages_per_producer": plan["messages"] or None,
            "duration_s": plan["duration_s"] or None,
            "producers": args.producers,
            "consumers": args.consumers,
            "peers": names,
            "quick": plan["quick"],
            "max_round_trips": plan["round_trips"],
            "attach_clients": ATTACH_CLIENTS,
        },
        "ceiling": {"memcpy": []},
        "peers": {},
        "attach": {},
    }
    peers: dict[str, Peer] = {}
    for name in names:
        peer = load(name)()
        reason = peer.available()
        if reason is None:
            peers[name] = peer
        else:
            report["peers"][name] = {"description": peer.description, "status": "skipped", "skipped": reason}

    steps = len(args.sizes) + 2 * len(args.sizes) * len(peers) + 2
    progress = Progress(steps)
    stale = _remove_stale()
    # Short (AF_UNIX paths), and named after our pid so a later run can tell it is stale.
    tmpdir = Path(tempfile.mkdtemp(prefix=f"shmbench-{os.getpid()}-", dir="/tmp"))
    ctx = RunContext(tmpdir=tmpdir, tag=f"shmbench{os.getpid()}_")
    failed = False
    from .runner import BenchError

    try:
        for size in args.sizes:
            progress.step(f"memcpy ceiling {size} B")
            report["ceiling"]["memcpy"].append({"size": size, **ceiling.memcpy(size, plan["ceiling_s"])})
            progress.advance()
        for name, peer in peers.items():
            try:
                peer.start(ctx)
                report["peers"][name] = _run_peer(peer, args.sizes, plan, lanes, progress)
            except BenchError as exc:
                report["peers"][name] = {"description": peer.description, "status": "failed", "error": str(exc), "sizes": []}
            except Exception as exc:  # a peer library failing to set up
                report["peers"][name] = {"description": peer.description, "status": "failed", "error": f"{type(exc).__name__}: {exc}", "sizes": []}
            finally:
                peer.stop()
            failed |= report["peers"][name]["status"] == "failed"
        report["attach"] = _run_attach(tmpdir, plan, progress)
        failed |= report["attach"]["status"] == "failed"
    finally:
        for peer in peers.values():
            peer.stop()
        leftovers = _remove_shm(ctx.tag)
        shutil.rmtree(tmpdir, ignore_errors=True)
    progress.finish()
    # Reorder peers as requested (skipped ones were filed first).
    report["peers"] = {name: report["peers"][name] for name in names}
    report["ratios"] = _ratios(report["peers"])
    report["wall_seconds"] = time.time() - started
    report["cleanup"] = {"tmpdir": str(tmpdir), "removed_from_dev_shm": leftovers, "stale_removed": stale}

    # JSON first: if anything below fails, the figures are already safe.
    if args.json:
        _write(args.json, lambda: jsonout.write(args.json, report))
    print(table.render(report))
    if args.plot:
        from . import plot

        _write(args.plot, lambda: plot.draw(report, args.plot))
    return 1 if failed else 0


def _write(path: str, write: Any) -> None:
    try:
        write()
    except OSError as exc:
        raise errors.ShmBrokerError(f"could not write {path}: {exc.strerror or exc}") from None
    print(f"wrote {path}", file=sys.stderr)


def _run_attach(tmpdir: Path, plan: dict[str, Any], progress: Progress) -> dict[str, Any]:
    from .attach import AttachBench
    from .runner import BenchError

    result: dict[str, Any] = {"status": "ok"}
    bench = None
    try:
        progress.step("attach latency")
        bench = AttachBench(tmpdir / "attach-broker")
        result["latency"] = bench.latency(plan["attaches"])
        progress.advance()
        progress.step(f"attach rate, {ATTACH_CLIENTS} clients")
        result["rate"] = bench.rate(ATTACH_CLIENTS, plan["churn_s"])
        progress.advance()
    except Exception as exc:
        result = {"status": "failed", "error": f"{exc}" if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"}
    finally:
        if bench is not None:
            bench.stop()
    return result
