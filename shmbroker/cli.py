"""The `shmbroker` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from . import __version__, errors
from ._escape import escape
from ._logging import FORMATS as LOG_FORMATS
from ._logging import configure as configure_logging
from ._types import STATUS_SCHEMA, Status

log = logging.getLogger(__name__)

# Where the shipped systemd unit (examples/systemd) and the docs put the config.
CONFIG_PATH = "/etc/shmbroker/broker.toml"

EPILOG = """\
examples:
  shmbroker serve --socket ~/.shm-demo/broker.sock --channel frames:16MiB
  shmbroker status --socket ~/.shm-demo/broker.sock
  shmbroker status --broker-user shmbroker      # a system broker run as user shmbroker
  shmbroker check-config /etc/shmbroker/broker.toml   # every error in the file, like sshd -t

Put the socket in a directory only you (or root) can write, such as
$XDG_RUNTIME_DIR or your home: anywhere others can write (a fixed name in
/tmp), another user could run a broker there first.  Clients talk only to a
broker running as their own uid, root or the shmbroker user; --broker-user,
SHMBROKER_BROKER_USER or `[broker] user` in --config names another one.

Without --config only processes of the broker's own uid, running the broker's
own executable, may attach; producers may create channels on demand.
"""


def _channel_arg(text: str) -> tuple[str, int, bool]:
    from ._broker.config import parse_size
    from ._wire.messages import valid_channel_name

    name, sep, rest = text.partition(":")
    size, _, kind = rest.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:SIZE or NAME:SIZE:ring, e.g. frames:16MiB")
    if not valid_channel_name(name):
        raise argparse.ArgumentTypeError(f"{name!r} is not a valid channel name (letters, digits, '.', '_', '-')")
    if kind not in ("", "ring", "raw"):
        raise argparse.ArgumentTypeError(f"{text!r}: the kind after the size must be 'ring' or 'raw', not {kind!r}")
    try:
        return name, parse_size(size), kind == "ring"
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmbroker",
        description="A secure shared-memory IPC broker: hands unlinked, leased segments to authenticated peers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"shmbroker {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="run the broker in the foreground", description="Run the broker in the foreground until SIGTERM or SIGINT.")
    serve.add_argument("--socket", metavar="PATH", help="listening socket (default: $SHMBROKER_SOCKET, $XDG_RUNTIME_DIR/shmbroker/broker.sock, or /run/shmbroker/broker.sock for root)")
    serve.add_argument("--config", metavar="FILE", help=f"TOML policy file, e.g. {CONFIG_PATH} (default: only the broker's own uid and executable)")
    serve.add_argument("--channel", metavar="NAME:SIZE[:ring]", action="append", type=_channel_arg, default=[], help="predeclare a channel, e.g. frames:16MiB, or events:1MiB:ring for a message ring (repeatable)")
    serve.add_argument(
        "--landlock", choices=("auto", "on", "off"), default="auto",
        help="restrict the broker's filesystem access after startup: auto (if the kernel has Landlock), "
        "on (refuse to start without it), off (default: auto)",
    )
    serve.add_argument(
        "--seccomp", choices=("off", "enforce", "trap", "log"), default="off",
        help="syscall allowlist once serving: enforce (kill the broker on anything else), trap (same, "
        "printing the Python stack that made the call), log (allow, kernel logs it); default: off",
    )
    serve.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text",
        help="log format: text (without the time when JOURNAL_STREAM says stderr is the journal, which "
        "adds it), json (one object per line; security events carry pid, uid, gid, exe, channel, role and "
        "rule as keys), or journal: structured entries to systemd's journal (fields SHMBROKER_EVENT, "
        "SHMBROKER_PEER_UID...; the shipped unit uses it) (default: text)",
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="also log debug messages")

    status = sub.add_parser("status", help="show channels, peers, counters and security events", description="Ask a running broker for its status.")
    status.add_argument("--socket", metavar="PATH", help="broker socket (default: [broker] socket of --config, else as for serve)")
    status.add_argument(
        "--config", metavar="FILE",
        help="the broker's TOML config: its [broker] user and socket become the defaults for --broker-user and --socket",
    )
    status.add_argument(
        "--broker-user", metavar="USER",
        help="user name or uid the broker must run as (default: [broker] user of --config, else "
        "$SHMBROKER_BROKER_USER, else your own uid, root or the shmbroker user)",
    )
    status.add_argument(
        "--json", action="store_true",
        help=f'print the status as JSON; "schema": {STATUS_SCHEMA} names its version, raised only when a key is '
        "removed or changes meaning",
    )
    status.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="give up after this long (default: 5)")

    check = sub.add_parser(
        "check-config", help="check a config file and report every problem in it, like sshd -t",
        description="Load FILE as `shmbroker serve --config FILE` would, without starting a broker: print every "
        "error as FILE: KEY: REASON, and every warning (such as an executables entry that can never match).",
        epilog="exit status: 0 the file is valid (warnings included); 2 it has errors, and serve would refuse it",
    )
    check.add_argument("file", metavar="FILE", help=f"the TOML config file, e.g. {CONFIG_PATH}")

    from . import _bench, _doctor

    doctor = sub.add_parser(
        "doctor", help="check which kernel security features this machine has",
        description="Probe leases, pidfds, Landlock, memfd seals, mlock, ptrace and core-dump settings, "
        "and say what each missing one means.",
        epilog=_doctor.EXIT_STATUS_HELP,
    )
    _doctor.add_arguments(doctor)

    bench = sub.add_parser(
        "bench", help="measure shmbroker beside pipes, sockets, queues and other shared-memory IPC",
        description="Measure throughput, latency, CPU per message and attach cost of shmbroker and its peers, "
        "in separate processes, on this machine.",
    )
    _bench.add_arguments(bench)
    return parser


def _serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_format, logging.DEBUG if args.verbose else logging.INFO)
    try:
        return _serve_configured(args)
    except errors.ShmBrokerError as exc:
        if args.log_format != "json":
            raise  # main() prints it as `shmbroker: MESSAGE`
        # A log pipeline reading JSON gets the fatal error as JSON too.
        log.critical("%s", exc, extra={"fields": {"error": type(exc).__name__}})
        return 2 if isinstance(exc, errors.ConfigError) else 1


def _serve_configured(args: argparse.Namespace) -> int:
    from ._broker.config import ChannelSpec, check_broker_user, default_config, load_config
    from ._broker.listener import Listener
    from ._ring.layout import resolve_max_message
    from ._broker.driver import Broker
    from ._broker.sandbox import Sandbox
    from ._paths import default_socket_path
    from ._sys import sdlisten
    from ._sys.sdnotify import Notifier

    config = load_config(args.config) if args.config else default_config()
    for warning in config.warnings:
        log.warning("%s", warning)
    for name, size, ring in args.channel:
        if size > config.limits.max_segment_size:
            raise errors.ConfigError(f"--channel {name}: size {size} exceeds max_segment_size ({config.limits.max_segment_size})")
        try:
            max_message = resolve_max_message(size, None) if ring else None
        except ValueError as exc:
            raise errors.ConfigError(f"--channel {name}: {exc}") from None
        config.channels[name] = ChannelSpec(name=name, size=size, ring=ring, max_message=max_message)
    try:
        activated = sdlisten.listen_socket()
    except sdlisten.ActivationError as exc:
        raise errors.ConfigError(f"socket activation: {exc}") from None
    if activated is not None:
        socket_path = activated.getsockname() or "(unnamed activated socket)"
        log.info("socket activation: serving on the socket passed by the service manager (%s)", socket_path)
    else:
        socket_path = args.socket or config.socket_path or default_socket_path()
        # Refuse a taken or unsafe socket path before hardening logs a line:
        # a broker that never started must not log that it stopped.
        Listener(socket_path, config.socket_group).check_free()
    check_broker_user(config)
    _harden_broker(config)
    sandbox = Sandbox(args.landlock, args.seccomp, socket_path, args.config)
    try:
        Broker(config, socket_path, listen_socket=activated, notifier=Notifier.from_env(), on_ready=sandbox.apply).run()
    finally:
        sandbox.close()
    return 0


def _harden_broker(config: Any) -> None:
    """Before the first segment exists: no dumps, no ptrace, minimal capabilities."""
    from ._sys.prctl import CAP_CHOWN
    from .hardening import BROKER_CAPABILITIES, harden_process

    keep = set(BROKER_CAPABILITIES)
    if config.socket_group is not None:
        keep.add(CAP_CHOWN)  # the listener chowns its socket to that group
    harden_process(keep_capabilities=keep)


def _fmt_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:g} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _fmt_duration(seconds: float) -> str:
    """``45s``, ``12m 5s``, ``3h 12m``, ``2d 3h``: the two largest units, as uptime(1) reads."""
    total = max(int(seconds), 0)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _print_status(status: Status) -> None:
    # Every string here comes from the broker's reply, and some from peers
    # (an executable's file name may hold a newline or ANSI escapes): each
    # is printed escaped (_t), so a peer can neither add lines nor hide any.
    broker = status["broker"]
    up = _fmt_duration(time.time() - broker["started"])
    print(f"broker {_t(broker['version'])}  pid {_t(broker['pid'])}  uid {_t(broker['uid'])}  up {up}")
    print(f"  socket {_t(broker['socket'])}  policy {_t(broker['policy'])}  connections {_t(status['connections'])}")
    print("channels:" if status["channels"] else "channels: none")
    for ch in status["channels"]:
        state = f"generation {_t(ch['generation'])}, " + ("live" if ch["live"] else "no segment")
        max_message = ch.get("max_message")
        kind = "raw" if not ch.get("ring") else "ring" if max_message is None else f"ring, messages up to {_fmt_size(max_message)}"
        print(f"  {_t(ch['name'])}  {_fmt_size(ch['size'])}  {_t(ch['backend'])}  {kind}  ({state})")
        for peer in ch["peers"]:
            unit, label = peer.get("unit"), peer.get("label")
            extra = (f"  unit {_t(unit)}" if unit else "") + (f"  label {_t(label)}" if label is not None else "")
            print(f"    {_t(peer['role']):<8} pid {_t(peer['pid']):<7} uid {_t(peer['uid']):<6} {_t(peer['exe'])}{extra}")
    counters = status["counters"]
    print("counters: " + (", ".join(f"{_t(k)}={_t(v)}" for k, v in counters.items()) or "none"))
    events = status["security_events"]
    print(f"security events: {len(events) or 'none'}")
    for ev in events:
        who = f"pid {_t(ev['pid'])} uid {_t(ev['uid'])}" if ev["pid"] is not None else "-"
        print(f"  {_fmt_time(ev['time'])} {_t(ev['kind'])} ({who}): {_t(ev['detail'])}")
    if "confinement" in status:  # brokers older than this client do not report it
        _print_confinement(status["confinement"])


def _t(value: Any) -> str:
    """One value of the reply as text that stays on its line (see _print_status)."""
    return escape(str(value))


def _print_confinement(c: dict[str, Any]) -> None:
    user, landlock, seccomp = c["user"], c["landlock"], c["seccomp"]
    print("confinement:")
    print(
        f"  user      {_t(user['name'] or '?')} (uid {_t(user['euid'])}), "
        f"group {_t(user['group'] or '?')} (gid {_t(user['egid'])})"
    )
    if landlock["state"] == "enforced":
        check = "reading / denied" if landlock["verified"] else "NOT VERIFIED: / is still readable"
        print(f"  landlock  enforced, ABI {_t(landlock['abi'])}, {_t(landlock['rules'])} rules ({check})")
    else:
        print(f"  landlock  {_t(landlock['state'])}: {_t(landlock['reason'])}")
    own = f", the broker's own allowlist: {_t(seccomp['broker_filter'])}" if seccomp["broker_filter"] != "off" else ""
    print(f"  seccomp   {_t(seccomp['mode_name'])} ({_t(seccomp['filters'] or 0)} filters{own})")
    core = c["rlimit_core"]
    print(
        f"  process   no_new_privs {'on' if c['no_new_privs'] else 'OFF'}, dumpable {_t(c['dumpable'])}, "
        f"RLIMIT_CORE {_t(core['soft'])}/{_t(core['hard'])}"
    )
    print(f"  caps      effective: {', '.join(_t(cap) for cap in c['capabilities']['effective']) or 'none'}")


def _status(args: argparse.Namespace) -> int:
    from . import _trust
    from ._client import ShmClient

    socket_path = args.socket
    broker_user: int | None = None
    if args.config:
        from ._broker.config import load_config

        config = load_config(args.config)
        socket_path = socket_path or config.socket_path
        broker_user = config.broker_user
    if args.broker_user is not None:
        try:
            broker_user = _trust.parse_user(args.broker_user)
        except ValueError as exc:
            raise errors.ConfigError(f"--broker-user {args.broker_user}: {exc}") from None
    status = ShmClient.status(socket_path=socket_path, timeout=args.timeout, broker_uid=broker_user)
    if args.json:
        # "schema" first: what a script checks before it reads anything else.
        json.dump({"schema": STATUS_SCHEMA, **status}, sys.stdout, indent=2)
        print()
    else:
        _print_status(status)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from ._broker.config import load_config

    try:
        config = load_config(args.file)
    except errors.ConfigError as exc:
        problems = str(exc).splitlines()
        for line in problems:
            print(line, file=sys.stderr)
        count = f"{len(problems)} error" + ("" if len(problems) == 1 else "s")
        print(f"{args.file}: {count}; `shmbroker serve` would refuse to start with this file", file=sys.stderr)
        return 2
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    rules, channels, warnings = len(config.policy.rules), len(config.channels), len(config.warnings)
    print(
        f"{args.file}: OK: {rules} rule{'s' * (rules != 1)}, {channels} configured channel{'s' * (channels != 1)}"
        + (f", {warnings} warning{'s' * (warnings != 1)}" if warnings else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from . import _bench, _doctor

    handlers = {
        "serve": _serve, "status": _status, "check-config": _check_config, "doctor": _doctor.run, "bench": _bench.run,
    }
    try:
        return handlers[args.command](args)
    except errors.ShmBrokerError as exc:
        # A config error lists every problem, one FILE: KEY: REASON a line.
        for line in str(exc).splitlines() or [""]:
            print(f"shmbroker: {line}", file=sys.stderr)
        return 2 if isinstance(exc, errors.ConfigError) else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `shmbroker status | head`: the reader left; nothing to report.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
