"""The TOML configuration file, validated completely at startup.

Every problem is reported as ``FILE: KEY: REASON`` and refuses the start: a
broker that guesses what a typo meant could end up more permissive than its
operator intended.

The file itself must be one nobody but root and the broker's uid can change
(like sshd's StrictModes and sudo's sudoers check): whoever can write the
policy admits themselves at the next restart.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import grp
import os
import pwd
import re
import socket
import stat
import sys
import tomllib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from .. import _trust
from .._sys import cgroup as syscgroup
from .._sys import peercred
from ..errors import ConfigError
from ..limits import DEFAULT_LIMITS, Limits
from .._wire.messages import valid_channel_name
from .._ring.layout import resolve_max_message
from .policy import ROLES, UNIT_SUFFIXES, Executables, Policy, Principals, Rule, default_policy, is_unit_name

# posix: leased shm_open object (detects openers); memfd: sealed (stops
# truncation).  The trade-off is in docs/attacks.md (A6).
BACKENDS = ("posix", "memfd")
# Liveness rules for [channels.NAME] wipe_when: "never" keeps the data while
# anyone is attached; "producer_gone" wipes and revokes the segment as soon as
# its last producer detaches or dies (a dead-man's switch for the secret).
WIPE_RULES = ("never", "producer_gone")

_SIZE = re.compile(r"\s*(\d+)\s*([KMG]i?B?|B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str | int) -> int:
    """Bytes from ``4096``, ``"64KiB"``, ``"16M"`` or ``"1GiB"`` (binary units)."""
    if isinstance(text, bool):
        raise ValueError("a size must be a number of bytes, e.g. 4096 or \"16MiB\"")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.fullmatch(text)
        if not match:
            raise ValueError(f"{text!r} is not a size; use bytes or a unit, e.g. 65536 or \"64KiB\"")
        value = int(match.group(1)) * _UNITS[(match.group(2) or "")[:1].lower()]
    if value <= 0:
        raise ValueError("a size must be positive")
    return value


@dataclasses.dataclass(frozen=True)
class ChannelSpec:
    name: str
    size: int
    backend: str = "posix"
    wipe_when: str = "never"
    ring: bool = False  # the payload holds a message ring (shmbroker/_ring)
    max_message: int | None = None  # ring channels only


@dataclasses.dataclass(frozen=True)
class BrokerConfig:
    policy: Policy
    channels: dict[str, ChannelSpec]
    limits: Limits = DEFAULT_LIMITS
    socket_path: str | None = None
    socket_group: int | None = None
    source: str | None = None
    # [broker] user: the only uid this broker may run as, and the one clients
    # reading this file (`shmbroker status --config`) accept as their broker.
    broker_user: int | None = None
    # FILE: KEY: REASON for settings that load but cannot do what they seem
    # to (an executable that can never match); `serve` logs them,
    # `check-config` prints them.
    warnings: tuple[str, ...] = ()


def default_config(channels: dict[str, ChannelSpec] | None = None) -> BrokerConfig:
    return BrokerConfig(policy=default_policy(os.getuid()), channels=channels or {})


def status_principals(base: Principals, operator_group: int | None) -> Principals:
    """Who may query status: ``base`` (``[status]``, else the broker's own
    uid), and always root and the members of ``[broker] operator_group``.

    Root can read the broker's memory and /proc anyway, so refusing it
    status protects nothing and only keeps the operator from inspecting a
    system service (issue 15); the operator group is the unprivileged way
    to grant the same view, like systemd-journal or adm for logs.
    """
    gids = base.gids | ({operator_group} if operator_group is not None else set())
    return Principals(uids=base.uids | {_trust.ROOT}, gids=frozenset(gids))


def load_config(path: str) -> BrokerConfig:
    try:
        data = tomllib.loads(_read_trusted(path).decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; give the path of an existing config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied reading the config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.filename}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return _Parser(path).parse(data)


def _read_trusted(path: str) -> bytes:
    """The file's bytes, if only root and this process's euid can change it.

    The directories are checked along the resolved path (see _trust for
    symlinks); the file itself through the fd we read from, so it cannot be
    swapped between the check and the read.
    """
    trusted = {_trust.ROOT, os.geteuid()}
    resolved = _trust.resolve(path)

    def refuse(reason: str) -> ConfigError:
        # FILE: REASON with the file as given; the reason says where it really is.
        via = "" if resolved == os.path.abspath(path) else f"it resolves to {resolved}, and "
        return ConfigError(f"{path}: {via}{reason}")

    try:
        _trust.check_directories(os.path.dirname(resolved), trusted)
    except _trust.UnsafePath as exc:
        who = f"uid {exc.uid}" if exc.foreign_owner else "others"
        raise refuse(
            f"directory {exc.message}, so {who} could replace the config file and admit themselves at the next "
            f"restart; run `{exc.fix}`, or keep the config in a directory only root can write (e.g. /etc/shmbroker)"
        ) from None
    # O_NOFOLLOW: the resolved name is no symlink unless one was swapped in
    # since; O_NONBLOCK: a FIFO put there cannot hang the start.
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise refuse("the file was replaced by a symbolic link while it was being opened") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise refuse("not a regular file")
        try:
            _trust.check_entry(resolved, st, trusted)
        except _trust.UnsafePath as exc:
            risk = f"so uid {exc.uid} could rewrite the policy" if exc.foreign_owner else "so others could add a rule"
            raise refuse(
                f"the config file {exc.message.removeprefix(resolved + ' ')}, {risk} and be admitted at the next "
                f"restart; run `{exc.fix}`"
            ) from None
        return f.read()


def check_broker_user(config: BrokerConfig) -> None:
    """Refuse to serve as another uid than ``[broker] user`` names: clients
    told to expect that user would refuse this broker anyway, and a broker
    started by the wrong account is a mistake worth stopping at once."""
    expected = config.broker_user
    euid = os.geteuid()
    if expected is None or expected == euid:
        return
    raise ConfigError(
        f"{config.source}: broker.user: this broker runs as uid {_trust.user_label(euid)}, but the config "
        f"says the broker is uid {_trust.user_label(expected)}; start it as that user (e.g. User= in its "
        "systemd unit), or change broker.user"
    )


# The file's top-level tables; docs/config.md describes every key of each.
SECTIONS = ("broker", "status", "limits", "channels", "rules")
_BROKER_KEYS = ("socket", "socket_group", "user", "operator_group")
_STATUS_KEYS = ("uids", "gids")
_CHANNEL_KEYS = ("size", "backend", "wipe_when", "ring", "max_message")
_RULE_KEYS = ("uids", "gids", "executables", "units", "cgroups", "labels", "channels", "roles", "create")
_GLOB = re.compile(r"[*?\[]")
ELF_MAGIC = b"\x7fELF"

_T = TypeVar("_T")


class _Invalid(Exception):
    """One key's problem.  The parser records it and goes on with the next
    key, so a single run reports every problem in the file."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(key, reason)
        self.key = key
        self.reason = reason


class _Reported(Exception):
    """A value whose problems were each recorded already: skip it, say nothing more."""


def _unknown(name: str, known: Iterable[str], what: str = "key") -> str:
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {what}{hint} (known: {', '.join(known)})"


@dataclasses.dataclass
class _RuleDraft:
    """A rule whose every key checked out; its executables are opened (and
    pinned) only once the whole file did, so a refused file pins nothing."""

    principals: Principals
    executables: list[str] | None
    channels: tuple[str, ...]
    roles: frozenset[str]
    create: bool
    units: tuple[str, ...] | None = None
    cgroups: tuple[str, ...] | None = None
    labels: tuple[str, ...] | None = None


def labels_unavailable() -> str | None:
    """Why no peer can have an LSM label here, or None if SO_PEERSEC answers.

    Asked of a socketpair of our own: where no LSM labels sockets, SO_PEERSEC
    fails with ENOPROTOOPT for every peer, and a `labels` key would match
    nobody; that is refused at load rather than discovered as a locked-out
    service."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        peercred.peer_security(a)
        return None
    except OSError as exc:
        lsms = syscgroup.active_lsms()
        active = f"active LSMs: {','.join(lsms)}" if lsms is not None else f"{syscgroup.LSM_LIST} is not readable"
        return (
            f"no LSM labels sockets on this system (SO_PEERSEC: {exc.strerror}; {active}), so no peer has a "
            "label and this rule could never match; enable SELinux, AppArmor or Smack, or tell peers apart "
            "by 'units', 'cgroups' or 'uids'"
        )
    finally:
        a.close()
        b.close()


def cgroups_unavailable(own_cgroup: str = "/proc/self/cgroup") -> str | None:
    """Why no peer can have a cgroup v2 path here, or None if we have one.

    A process's cgroup v2 path is the ``0::`` line of /proc/PID/cgroup; on a
    cgroup v1-only system no process has one, so `units` and `cgroups`
    would match nobody: refused at load, like `labels` without an LSM."""
    try:
        with open(own_cgroup, encoding="utf-8", errors="surrogateescape") as f:
            if any(line.startswith("0::") for line in f):
                return None
    except OSError as exc:
        return f"{own_cgroup} cannot be read ({exc.strerror}), so no peer's cgroup can be known"
    return (
        "this system has no cgroup v2 hierarchy (no '0::' line in /proc/self/cgroup), so no peer has a "
        "cgroup path or unit and this rule could never match; boot with the unified or hybrid cgroup "
        "hierarchy, or tell peers apart by 'uids'"
    )


class _Parser:
    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self._no_labels: str | None | bool = False  # not asked yet
        self._no_cgroups: str | None | bool = False

    def fail(self, key: str, reason: str) -> _Invalid:
        return _Invalid(key, reason)

    def report(self, key: str, reason: str) -> None:
        self.problems.append(f"{self.path}: {key}: {reason}")

    def warn(self, key: str, reason: str) -> None:
        self.warnings.append(f"{self.path}: {key}: {reason}")

    def check(self, parse: Callable[[], _T], default: _T) -> _T:
        """``parse()``, or ``default`` with its problem recorded."""
        try:
            return parse()
        except _Invalid as exc:
            self.report(exc.key, exc.reason)
            return default
        except _Reported:
            return default

    def table(self, value: Any, key: str, allowed: Iterable[str] | None) -> dict[str, Any]:
        """``value`` as a table; each unknown key in it is a problem of its own (left out)."""
        if not isinstance(value, dict):
            raise self.fail(key, "must be a table")
        if allowed is None:
            return value
        known = set(allowed)
        for name in sorted(set(value) - known):
            self.report(f"{key}.{name}", _unknown(name, known))
        return {k: v for k, v in value.items() if k in known}

    def parse(self, data: dict[str, Any]) -> BrokerConfig:
        for name in sorted(set(data) - set(SECTIONS)):
            self.report(name, _unknown(name, SECTIONS, "section"))
        broker: dict[str, Any] = self.check(lambda: self.table(data.get("broker", {}), "broker", _BROKER_KEYS), {})
        socket_path = self.check(lambda: self.socket(broker.get("socket")), None)
        group = broker.get("socket_group")
        socket_group = None if group is None else self.check(lambda: self.gid(group, "broker.socket_group"), None)
        operator = broker.get("operator_group")
        operator_group = None if operator is None else self.check(lambda: self.gid(operator, "broker.operator_group"), None)
        user = broker.get("user")
        broker_user = None if user is None else self.check(lambda: self.uid(self._numeric(user), "broker.user"), None)
        limits = self.check(lambda: self.limits(self.table(data.get("limits", {}), "limits", None)), DEFAULT_LIMITS)
        channels: dict[str, ChannelSpec] = self.check(lambda: self.channels(self.table(data.get("channels", {}), "channels", None), limits), {})
        drafts: list[_RuleDraft] = self.check(lambda: self.rules(data.get("rules")), [])
        status_table: dict[str, Any] = self.check(lambda: self.table(data.get("status", {}), "status", _STATUS_KEYS), {})
        status = Principals(uids=frozenset({os.getuid()}))
        if status_table:
            status = self.check(lambda: self.principals(status_table, "status"), status)
        status = status_principals(status, operator_group)
        if self.problems:
            raise ConfigError("\n".join(self.problems))
        return BrokerConfig(
            policy=Policy(rules=self.build_rules(drafts), status=status),
            channels=channels,
            limits=limits,
            socket_path=socket_path,
            socket_group=socket_group,
            source=self.path,
            broker_user=broker_user,
            warnings=tuple(self.warnings),
        )

    def socket(self, value: Any) -> str | None:
        if value is not None and (not isinstance(value, str) or not os.path.isabs(value)):
            raise self.fail("broker.socket", "must be an absolute path")
        return value

    def limits(self, table: dict[str, Any]) -> Limits:
        """Each limit checked on its own, so every bad one is reported."""
        known = {f.name for f in dataclasses.fields(Limits)}
        good = {}
        for name, value in table.items():
            if name not in known:
                self.report(f"limits.{name}", _unknown(name, known, "limit"))
                continue
            try:
                Limits(**{name: value})
            except ValueError as exc:
                # Limits says "NAME must be ..."; the key already names it.
                self.report(f"limits.{name}", str(exc).removeprefix(f"{name} "))
                continue
            good[name] = value
        try:
            return Limits(**good)
        except ValueError as exc:
            raise self.fail("limits", str(exc)) from None

    def channels(self, table: dict[str, Any], limits: Limits) -> dict[str, ChannelSpec]:
        specs = {}
        for name, body in table.items():
            key = f"channels.{name}"
            if not valid_channel_name(name):
                self.report(key, "invalid channel name (letters, digits, '.', '_', '-'; at most 64)")
                continue
            if not isinstance(body, dict):
                self.report(key, "must be a table with at least 'size'")
                continue
            spec = self.check(lambda: self.channel(name, self.table(body, key, _CHANNEL_KEYS), limits), None)
            if spec is not None:
                specs[name] = spec
        return specs

    def channel(self, name: str, body: dict[str, Any], limits: Limits) -> ChannelSpec | None:
        key = f"channels.{name}"
        before = len(self.problems)
        size = self.check(lambda: self.size(body, key, limits), None)
        backend = body.get("backend", "posix")
        if backend not in BACKENDS:
            self.report(f"{key}.backend", f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
        wipe_when = body.get("wipe_when", "never")
        if wipe_when not in WIPE_RULES:
            self.report(f"{key}.wipe_when", f"unknown rule {wipe_when!r} (known: {', '.join(WIPE_RULES)})")
        ring = body.get("ring", False)
        max_message = None
        if not isinstance(ring, bool):
            self.report(f"{key}.ring", "must be true or false")
        elif "max_message" in body:
            if not ring:
                self.report(f"{key}.max_message", "only ring channels have messages; add ring = true")
            else:
                max_message = self.check(lambda: self.parse_size(body["max_message"], f"{key}.max_message"), None)
        if len(self.problems) > before or size is None:
            return None
        if ring:
            try:
                max_message = resolve_max_message(size, max_message)
            except ValueError as exc:
                raise self.fail(f"{key}.max_message" if "max_message" in body else f"{key}.size", str(exc)) from None
        return ChannelSpec(name=name, size=size, backend=backend, wipe_when=wipe_when, ring=ring, max_message=max_message)

    def size(self, body: dict[str, Any], key: str, limits: Limits) -> int:
        if "size" not in body:
            raise self.fail(f"{key}.size", "missing; give the payload size, e.g. \"16MiB\"")
        size = self.parse_size(body["size"], f"{key}.size")
        if size > limits.max_segment_size:
            raise self.fail(f"{key}.size", f"{size} exceeds limits.max_segment_size ({limits.max_segment_size})")
        return size

    def parse_size(self, value: Any, key: str) -> int:
        try:
            return parse_size(value)
        except (ValueError, TypeError) as exc:
            raise self.fail(key, str(exc) if isinstance(exc, ValueError) else f"{value!r} is not a size") from None

    def rules(self, value: Any) -> list[_RuleDraft]:
        if value is None:
            raise self.fail("rules", "missing; add at least one [[rules]] table, or nobody can attach")
        if not isinstance(value, list) or not value:
            raise self.fail("rules", "must be a non-empty array of tables ([[rules]])")
        drafts = []
        for i, body in enumerate(value):
            key = f"rules[{i}]"
            if not isinstance(body, dict):
                self.report(key, "must be a table")
                continue
            draft = self.check(lambda: self.rule(self.table(body, key, _RULE_KEYS), key), None)
            if draft is not None:
                drafts.append(draft)
        return drafts

    def rule(self, body: dict[str, Any], key: str) -> _RuleDraft | None:
        before = len(self.problems)
        principals = self.check(lambda: self.principals(body, key), None)
        executables = None
        if "executables" in body:
            executables = self.check(lambda: self.executables(body["executables"], f"{key}.executables"), None)
        no_strings: list[str] = []
        channels = tuple(self.check(lambda: self.strings(body.get("channels", ["*"]), f"{key}.channels"), no_strings))
        roles = frozenset(self.check(lambda: self.strings(body.get("roles", sorted(ROLES)), f"{key}.roles"), sorted(ROLES)))
        if not roles or not roles <= ROLES:
            self.report(f"{key}.roles", "must list 'producer' and/or 'consumer'")
        create = body.get("create", False)
        if not isinstance(create, bool):
            self.report(f"{key}.create", "must be true or false")
        units = cgroups = labels = None
        if "units" in body:
            units = self.check(lambda: self.units(body["units"], f"{key}.units"), None)
        if "cgroups" in body:
            cgroups = self.check(lambda: self.cgroups(body["cgroups"], f"{key}.cgroups"), None)
        if "labels" in body:
            labels = self.check(lambda: self.labels(body["labels"], f"{key}.labels"), None)
        if len(self.problems) > before or principals is None:
            return None
        return _RuleDraft(principals, executables, channels, roles, create, units, cgroups, labels)

    def patterns(self, value: Any, key: str, check: Callable[[str], str | None]) -> tuple[str, ...]:
        """A non-empty array of strings, each checked; every bad one is reported."""
        items = self.strings(value, key)
        if not items:
            raise self.fail(key, "must not be empty (leave the key out to allow any)")
        bad = 0
        for item in items:
            problem = check(item)
            if problem is not None:
                self.report(key, f"{item!r} {problem}")
                bad += 1
        if bad:
            raise _Reported
        return tuple(items)

    def need_cgroups(self, key: str) -> None:
        if self._no_cgroups is False:
            self._no_cgroups = cgroups_unavailable()
        if isinstance(self._no_cgroups, str):
            raise self.fail(key, self._no_cgroups)

    def units(self, value: Any, key: str) -> tuple[str, ...]:
        def check(name: str) -> str | None:
            if "/" in name:
                return "is a cgroup path, not a unit name; put paths in 'cgroups'"
            suffix = name.rpartition(".")[2]
            if suffix == "slice":
                return ("is a slice: a slice holds units and is never a process's unit; name its cgroups "
                        "instead, e.g. cgroups = [\"/" + name + "/*\"]")
            if not _GLOB.search(name) and not is_unit_name(name):
                return f"is not a systemd unit name (NAME.TYPE, TYPE one of {', '.join(sorted(UNIT_SUFFIXES - {'slice'}))})"
            return None
        units = self.patterns(value, key, check)
        self.need_cgroups(key)
        return units

    def cgroups(self, value: Any, key: str) -> tuple[str, ...]:
        def check(path: str) -> str | None:
            if not path.startswith("/"):
                return "must be an absolute cgroup path as /proc/PID/cgroup shows it, e.g. \"/system.slice/camera.service\""
            parts = path.split("/")[1:]
            if path != "/" and any(p in ("", ".", "..") for p in parts):
                return "must not contain empty, '.' or '..' components"
            return None
        paths = self.patterns(value, key, check)
        self.need_cgroups(key)
        return paths

    def labels(self, value: Any, key: str) -> tuple[str, ...]:
        items = self.patterns(value, key, lambda label: None)
        if self._no_labels is False:
            self._no_labels = labels_unavailable()
        if isinstance(self._no_labels, str):
            raise self.fail(key, self._no_labels)
        return items

    def executables(self, value: Any, key: str) -> list[str]:
        paths = self.strings(value, key)
        good = []
        for path in paths:
            if not os.path.isabs(path):
                self.report(key, f"{path!r} is not an absolute path")
                continue
            try:
                os.stat(path)
            except OSError as exc:
                self.report(key, f"{path}: {exc.strerror}")
                continue
            self.check_binary(path, key)
            good.append(path)
        if len(good) < len(paths):
            raise _Reported
        return good

    def check_binary(self, path: str, key: str) -> None:
        """Warn about an entry that can never match: the broker compares
        /proc/PID/exe, the binary the kernel runs, and for a script that is
        its interpreter, never the script."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return  # unreadable to us (mode 0711, say): it may well be a binary
        try:
            st = os.fstat(fd)
            head = os.read(fd, 128) if stat.S_ISREG(st.st_mode) else b""
        except OSError:
            return
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            self.warn(key, f"{path} is not a regular file, so no process can run it and this entry never matches")
        elif head.startswith(b"#!"):
            shebang = head.split(b"\n", 1)[0].decode("utf-8", "replace")
            self.warn(
                key,
                f"{path} is a script ({shebang!r}), not an ELF binary, so this entry never matches: the broker "
                "matches /proc/PID/exe, which for a script is its interpreter. A Python client's executable is "
                "the Python interpreter running it (e.g. " + os.path.realpath(sys.executable) + "); name the "
                "interpreter instead, and tell clients apart by uids and gids",
            )
        elif not head.startswith(ELF_MAGIC):
            self.warn(
                key,
                f"{path} is not an ELF binary, so this entry never matches: the broker matches /proc/PID/exe, "
                "the binary the kernel runs; name that binary",
            )

    def build_rules(self, drafts: list[_RuleDraft]) -> tuple[Rule, ...]:
        rules = []
        try:
            for i, d in enumerate(drafts):
                executables = None
                if d.executables is not None:
                    try:
                        executables = Executables.from_paths(d.executables)
                    except OSError as exc:  # replaced or removed since it was checked
                        raise ConfigError(f"{self.path}: rules[{i}].executables: {exc.filename}: {exc.strerror}") from None
                rules.append(Rule(
                    d.principals, executables, d.channels, d.roles, d.create,
                    units=d.units, cgroups=d.cgroups, labels=d.labels,
                ))
        except BaseException:
            for rule in rules:
                if rule.executables is not None:
                    for fd in rule.executables.pins:
                        os.close(fd)
            raise
        return tuple(rules)

    def principals(self, body: dict[str, Any], key: str) -> Principals:
        uids = self.ids(body.get("uids", []), f"{key}.uids", self.uid)
        gids = self.ids(body.get("gids", []), f"{key}.gids", self.gid)
        if not body.get("uids") and not body.get("gids"):
            raise self.fail(key, "must name at least one of 'uids' or 'gids' (who the rule is for)")
        if uids is None or gids is None:
            raise _Reported
        return Principals(frozenset(uids), frozenset(gids))

    def ids(self, value: Any, key: str, resolve: Callable[[Any, str], int]) -> list[int] | None:
        """Every id in the array, or None once each bad one has been reported."""
        items = self.check(lambda: self.array(value, key), None)
        if items is None:
            return None
        before = len(self.problems)
        ids = [self.check(lambda: resolve(item, key), -1) for item in items]
        return None if len(self.problems) > before else ids

    def array(self, value: Any, key: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(key, "must be an array")
        return value

    def strings(self, value: Any, key: str) -> list[str]:
        items = self.array(value, key)
        if not all(isinstance(v, str) and v for v in items):
            raise self.fail(key, "must be an array of non-empty strings")
        return items

    @staticmethod
    def _numeric(value: Any) -> Any:
        """``user = "998"`` means uid 998, as SHMBROKER_BROKER_USER=998 does."""
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    def uid(self, value: Any, key: str) -> int:
        return self._id(value, key, lambda n: pwd.getpwnam(n).pw_uid, "user")

    def gid(self, value: Any, key: str) -> int:
        return self._id(value, key, lambda n: grp.getgrnam(n).gr_gid, "group")

    def _id(self, value: Any, key: str, lookup: Callable[[str], int], what: str) -> int:
        if isinstance(value, bool):
            raise self.fail(key, f"{value!r} is not a {what} name or id")
        if isinstance(value, int):
            if not 0 <= value < 2**32 - 1:
                raise self.fail(key, f"{value} is not a valid {what} id")
            return value
        if isinstance(value, str):
            try:
                return lookup(value)
            except KeyError:
                raise self.fail(key, f"no such {what}: {value!r}") from None
        raise self.fail(key, f"{value!r} is not a {what} name or id")
