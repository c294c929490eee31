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
import errno
import grp
import os
import pwd
import re
import stat
import tomllib
from collections.abc import Callable
from typing import Any

from .. import _trust
from ..errors import ConfigError
from ..limits import DEFAULT_LIMITS, Limits
from .._wire.messages import valid_channel_name
from .._ring.layout import resolve_max_message
from .policy import ROLES, Executables, Policy, Principals, Rule, default_policy

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
        raise ConfigError(f"{path}: no such file; pass --config with an existing file") from None
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


class _Parser:
    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {reason}")

    def table(self, data: dict[str, Any], key: str, allowed: set[str]) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, "must be a table")
        unknown = sorted(set(value) - allowed) if allowed else []
        if unknown:
            raise self.fail(f"{key}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(allowed))})")
        return value

    def parse(self, data: dict[str, Any]) -> BrokerConfig:
        unknown = sorted(set(data) - {"broker", "status", "limits", "channels", "rules"})
        if unknown:
            raise self.fail(unknown[0], "unknown section (known: broker, status, limits, channels, rules)")
        broker = self.table(data, "broker", {"socket", "socket_group", "user", "operator_group"})
        socket_path = broker.get("socket")
        if socket_path is not None and (not isinstance(socket_path, str) or not os.path.isabs(socket_path)):
            raise self.fail("broker.socket", "must be an absolute path")
        group = broker.get("socket_group")
        socket_group = None if group is None else self.gid(group, "broker.socket_group")
        operator = broker.get("operator_group")
        operator_group = None if operator is None else self.gid(operator, "broker.operator_group")
        user = broker.get("user")
        broker_user = None if user is None else self.uid(self._numeric(user), "broker.user")

        try:
            limits = Limits.from_mapping(self.table(data, "limits", set()))
        except ValueError as exc:
            raise self.fail("limits", str(exc)) from None

        channels = self.channels(self.table(data, "channels", set()), limits)
        rules = self.rules(data.get("rules"))
        status_table = self.table(data, "status", {"uids", "gids"})
        if status_table:
            status = self.principals(status_table, "status")
        else:
            status = Principals(uids=frozenset({os.getuid()}))
        status = status_principals(status, operator_group)
        return BrokerConfig(
            policy=Policy(rules=rules, status=status),
            channels=channels,
            limits=limits,
            socket_path=socket_path,
            socket_group=socket_group,
            source=self.path,
            broker_user=broker_user,
        )

    def channels(self, table: dict[str, Any], limits: Limits) -> dict[str, ChannelSpec]:
        specs = {}
        for name, body in table.items():
            key = f"channels.{name}"
            if not valid_channel_name(name):
                raise self.fail(key, "invalid channel name (letters, digits, '.', '_', '-'; at most 64)")
            if not isinstance(body, dict):
                raise self.fail(key, "must be a table with at least 'size'")
            known = {"size", "backend", "wipe_when", "ring", "max_message"}
            unknown = sorted(set(body) - known)
            if unknown:
                raise self.fail(f"{key}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(known))})")
            if "size" not in body:
                raise self.fail(f"{key}.size", "missing; give the payload size, e.g. \"16MiB\"")
            try:
                size = parse_size(body["size"])
            except ValueError as exc:
                raise self.fail(f"{key}.size", str(exc)) from None
            if size > limits.max_segment_size:
                raise self.fail(f"{key}.size", f"{size} exceeds limits.max_segment_size ({limits.max_segment_size})")
            backend = body.get("backend", "posix")
            if backend not in BACKENDS:
                raise self.fail(f"{key}.backend", f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
            wipe_when = body.get("wipe_when", "never")
            if wipe_when not in WIPE_RULES:
                raise self.fail(f"{key}.wipe_when", f"unknown rule {wipe_when!r} (known: {', '.join(WIPE_RULES)})")
            ring = body.get("ring", False)
            if not isinstance(ring, bool):
                raise self.fail(f"{key}.ring", "must be true or false")
            max_message = None
            if "max_message" in body:
                if not ring:
                    raise self.fail(f"{key}.max_message", "only ring channels have messages; add ring = true")
                try:
                    max_message = parse_size(body["max_message"])
                except ValueError as exc:
                    raise self.fail(f"{key}.max_message", str(exc)) from None
            if ring:
                try:
                    max_message = resolve_max_message(size, max_message)
                except ValueError as exc:
                    raise self.fail(f"{key}.max_message" if "max_message" in body else f"{key}.size", str(exc)) from None
            specs[name] = ChannelSpec(
                name=name, size=size, backend=backend, wipe_when=wipe_when, ring=ring, max_message=max_message
            )
        return specs

    def rules(self, value: Any) -> tuple[Rule, ...]:
        if value is None:
            raise self.fail("rules", "missing; add at least one [[rules]] table, or nobody can attach")
        if not isinstance(value, list) or not value:
            raise self.fail("rules", "must be a non-empty array of tables ([[rules]])")
        rules = []
        allowed = {"uids", "gids", "executables", "channels", "roles", "create"}
        for i, body in enumerate(value):
            key = f"rules[{i}]"
            if not isinstance(body, dict):
                raise self.fail(key, "must be a table")
            unknown = sorted(set(body) - allowed)
            if unknown:
                raise self.fail(f"{key}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(allowed))})")
            principals = self.principals(body, key)
            executables = None
            if "executables" in body:
                paths = self.strings(body["executables"], f"{key}.executables")
                for path in paths:
                    if not os.path.isabs(path):
                        raise self.fail(f"{key}.executables", f"{path!r} is not an absolute path")
                try:
                    executables = Executables.from_paths(paths)
                except OSError as exc:
                    raise self.fail(f"{key}.executables", f"{exc.filename}: {exc.strerror}") from None
            channels = tuple(self.strings(body.get("channels", ["*"]), f"{key}.channels"))
            roles = frozenset(self.strings(body.get("roles", sorted(ROLES)), f"{key}.roles"))
            if not roles or not roles <= ROLES:
                raise self.fail(f"{key}.roles", "must list 'producer' and/or 'consumer'")
            create = body.get("create", False)
            if not isinstance(create, bool):
                raise self.fail(f"{key}.create", "must be true or false")
            rules.append(Rule(principals, executables, channels, roles, create))
        return tuple(rules)

    def principals(self, body: dict[str, Any], key: str) -> Principals:
        uids = [self.uid(u, f"{key}.uids") for u in self.list(body.get("uids", []), f"{key}.uids")]
        gids = [self.gid(g, f"{key}.gids") for g in self.list(body.get("gids", []), f"{key}.gids")]
        if not uids and not gids:
            raise self.fail(key, "must name at least one of 'uids' or 'gids' (who the rule is for)")
        return Principals(frozenset(uids), frozenset(gids))

    def list(self, value: Any, key: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(key, "must be an array")
        return value

    def strings(self, value: Any, key: str) -> list[str]:
        items = self.list(value, key)
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
