"""Config files are validated completely at startup; policy decisions are pure."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shmbroker._broker.config import load_config, parse_size
from shmbroker._broker.policy import Identity, default_policy
from shmbroker.errors import ConfigError, PermissionDenied
from shmbroker.limits import Limits


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    return str(path)


def ident(uid: int = 1000, gid: int = 1000, groups: tuple[int, ...] = (), exe: tuple[int, int] = (1, 2)) -> Identity:
    return Identity(pid=42, uid=uid, gid=gid, groups=groups, exe=exe, exe_path="/usr/bin/x")


GOOD = """
[broker]
socket = "/run/shmb/broker.sock"

[limits]
max_connections_per_uid = 8

[status]
uids = [0]

[channels.frames]
size = "16MiB"

[[rules]]
uids = [1000]
channels = ["frames"]
roles = ["producer"]

[[rules]]
gids = [44]
channels = ["frames", "aux-*"]
roles = ["consumer"]
create = false
"""


def test_good_config_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.channels["frames"].size == 16 * 1024 * 1024
    assert cfg.limits.max_connections_per_uid == 8
    assert cfg.socket_path == "/run/shmb/broker.sock"
    policy = cfg.policy
    policy.authorize_attach(ident(uid=1000), "frames", "producer")
    # Supplementary groups count.
    policy.authorize_attach(ident(uid=2000, gid=2000, groups=(44,)), "aux-1", "consumer")
    with pytest.raises(PermissionDenied, match=r"uid 1000 may not attach to channel 'frames' as consumer \(allowed uids: none; gids: 44\)"):
        policy.authorize_attach(ident(uid=1000), "frames", "consumer")
    with pytest.raises(PermissionDenied, match="no rule allows producers on channel 'other'"):
        policy.authorize_attach(ident(uid=1000), "other", "producer")
    with pytest.raises(PermissionDenied, match="uid 3000"):
        policy.admit(ident(uid=3000, gid=3000))
    assert policy.may_query_status(ident(uid=0, gid=0))
    assert not policy.may_query_status(ident(uid=1000))


@pytest.mark.parametrize(
    "text, message",
    [
        ("[[rules]]\nuids = [1000]\nfoo = 1\n", r"rules\[0\]\.foo: unknown key"),
        ("[[rules]]\nchannels = ['*']\n", r"rules\[0\]: must name at least one of 'uids' or 'gids'"),
        ("[broker]\nsocket = 'relative.sock'\n[[rules]]\nuids=[1]\n", "broker.socket: must be an absolute path"),
        ("[limits]\nmax_frame_size = 0\n[[rules]]\nuids=[1]\n", r"limits\.max_frame_size: must be positive, not 0"),
        ("[limits]\nmax_conections = 5\n[[rules]]\nuids=[1]\n", r"limits\.max_conections: unknown limit; did you mean 'max_connections'\?"),
        ("[channels.frames]\nsize = 1.5\n[[rules]]\nuids=[1]\n", r"channels\.frames\.size: 1\.5 is not a size"),
        ("[channels.frames]\nsize = '12 parsecs'\n[[rules]]\nuids=[1]\n", "channels.frames.size: .* is not a size"),
        ("[channels.frames]\nsize = 10\nbackend = 'sysv'\n[[rules]]\nuids=[1]\n", "channels.frames.backend: unknown backend 'sysv'"),
        ("[channels.'a/b']\nsize = 10\n[[rules]]\nuids=[1]\n", "channels.a/b: invalid channel name"),
        ("[[rules]]\nuids = ['no-such-user-xyz']\n", r"rules\[0\]\.uids: no such user: 'no-such-user-xyz'"),
        ("[[rules]]\nuids = [1]\nroles = ['admin']\n", r"rules\[0\]\.roles: must list 'producer' and/or 'consumer'"),
        ("[[rules]]\nuids = [1]\ncreate = 'yes'\n", r"rules\[0\]\.create: must be true or false"),
        ("[[rules]]\nuids = [1]\nexecutables = ['/no/such/binary']\n", r"rules\[0\]\.executables: /no/such/binary: No such file"),
        ("[[rules]]\nuids = [1]\nexecutables = ['python']\n", r"rules\[0\]\.executables: 'python' is not an absolute path"),
        ("[status]\nuids = [1]\n", "rules: missing; add at least one"),
        ("[[rules]]\nuids = [true]\n", r"rules\[0\]\.uids: True is not a user"),
        ("[typo]\n[[rules]]\nuids=[1]\n", "typo: unknown section"),
        ("this is = not toml = at all", "not valid TOML"),
    ],
)
def test_bad_config_names_file_key_and_reason(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(info.value).startswith(path + ": ")


def test_executables_are_matched_by_inode_not_path(tmp_path: Path) -> None:
    exe = tmp_path / "tool"
    exe.write_bytes(b"#!/bin/sh\n")
    link = tmp_path / "same-tool"
    os.link(exe, link)
    cfg = load_config(write(tmp_path, f"[[rules]]\nuids = [1000]\nexecutables = ['{link}']\n"))
    st = os.stat(exe)
    cfg.policy.authorize_attach(ident(exe=(st.st_dev, st.st_ino)), "any", "producer")
    # Same path string, different file: replaced after the policy loaded.
    exe.unlink()
    exe.write_bytes(b"#!/bin/sh\n")
    st2 = os.stat(exe)
    with pytest.raises(PermissionDenied, match="executable"):
        cfg.policy.authorize_attach(ident(exe=(st2.st_dev, st2.st_ino)), "any", "producer")


def test_default_policy_is_own_uid_and_own_executable() -> None:
    policy = default_policy(1000, sys.executable)
    st = os.stat(sys.executable)
    me = ident(uid=1000, exe=(st.st_dev, st.st_ino))
    policy.authorize_attach(me, "anything", "consumer")
    assert policy.may_create(me, "anything", "producer")
    assert not policy.may_create(me, "anything", "consumer")
    with pytest.raises(PermissionDenied, match="uid 1001"):
        policy.admit(ident(uid=1001, exe=me.exe))
    # Another executable of the same uid may ask for status, never attach.
    policy.admit(ident(uid=1000, exe=(0, 0)))
    with pytest.raises(PermissionDenied, match="executable"):
        policy.authorize_attach(ident(uid=1000, exe=(0, 0)), "anything", "consumer")


@pytest.mark.parametrize("text, value", [("4096", 4096), ("64KiB", 65536), ("16M", 16 << 20), ("1GiB", 1 << 30), (" 2 kb ", 2048)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-1", "0", "1.5M", "12 parsecs", "M"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_serve_refuses_bad_config_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "[[rules]]\nuids = [1]\nbogus = 2\n")
    proc = subprocess.run(
        [sys.executable, "-m", "shmbroker", "serve", "--config", path, "--socket", str(tmp_path / "s" / "b.sock")],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2
    assert f"{path}: rules[0].bogus: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_error_in_the_file_is_reported_in_one_run(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[broker]
socket = "relative.sock"
sokcet_group = "video"

[limits]
max_frame_size = 0
max_conections = 5

[channels.frames]
size = "12 parsecs"
backend = "sysv"

[channels.ok]
size = "1MiB"

[[rules]]
uids = ["no-such-user-xyz", 1000]
roles = ["admin"]

[[rules]]
gids = [44]
create = "yes"
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert lines == [
        f"{path}: broker.sokcet_group: unknown key; did you mean 'socket_group'? (known: operator_group, socket, socket_group, user)",
        f"{path}: broker.socket: must be an absolute path",
        f"{path}: limits.max_frame_size: must be positive, not 0",
        f"{path}: limits.max_conections: unknown limit; did you mean 'max_connections'? (known: {KNOWN_LIMITS})",
        f"{path}: channels.frames.size: '12 parsecs' is not a size; use bytes or a unit, e.g. 65536 or \"64KiB\"",
        f"{path}: channels.frames.backend: unknown backend 'sysv' (known: posix, memfd)",
        f"{path}: rules[0].uids: no such user: 'no-such-user-xyz'",
        f"{path}: rules[0].roles: must list 'producer' and/or 'consumer'",
        f"{path}: rules[1].create: must be true or false",
    ]


KNOWN_LIMITS = ", ".join(sorted(f.name for f in dataclasses.fields(Limits)))


def test_a_script_named_in_executables_is_a_warning_that_says_why(tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text("#!/usr/bin/env python3\nprint('hi')\n")
    script.chmod(0o755)
    data = tmp_path / "notes.txt"
    data.write_text("not a program\n")
    interpreter = os.path.realpath(sys.executable)
    cfg = load_config(write(tmp_path, f"[[rules]]\nuids = [1000]\nexecutables = ['{script}', '{data}', '{interpreter}']\n"))
    assert len(cfg.warnings) == 2, cfg.warnings
    script_warning, data_warning = cfg.warnings
    assert f"rules[0].executables: {script} is a script ('#!/usr/bin/env python3'), not an ELF binary, so this entry never matches" in script_warning
    assert "/proc/PID/exe, which for a script is its interpreter" in script_warning
    assert f"A Python client's executable is the Python interpreter running it (e.g. {interpreter})" in script_warning
    assert f"{data} is not an ELF binary" in data_warning
    # Warnings, not errors: the interpreter itself is a fine entry, and the file still loads.
    assert len(cfg.policy.rules[0].executables.ids) == 3


def check_config(path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmbroker", "check-config", path], capture_output=True, text=True, timeout=30)


def test_check_config_exits_0_for_a_valid_file_and_prints_its_warnings(tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text("#!/usr/bin/python3\n")
    proc = check_config(write(tmp_path, GOOD + f"\n[[rules]]\nuids = [0]\nexecutables = ['{script}']\n"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{tmp_path / 'broker.toml'}: OK: 3 rules, 1 configured channel, 1 warning\n"
    assert proc.stderr.startswith(f"warning: {tmp_path / 'broker.toml'}: rules[2].executables: {script} is a script")


def test_check_config_exits_2_with_every_error_and_no_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "[broker]\nsocket = 'relative.sock'\n[[rules]]\nuids = ['no-such-user-xyz']\nbogus = 1\n")
    proc = check_config(path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"{path}: broker.socket: must be an absolute path",
        f"{path}: rules[0].bogus: unknown key (known: cgroups, channels, create, executables, gids, labels, roles, uids, units)",
        f"{path}: rules[0].uids: no such user: 'no-such-user-xyz'",
        f"{path}: 3 errors; `shmbroker serve` would refuse to start with this file",
    ]
    missing = check_config(str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "nope.toml: no such file" in missing.stderr and "Traceback" not in missing.stderr


def test_serve_logs_config_warnings(tmp_path: Path, broker_factory: Any) -> None:
    script = tmp_path / "client.py"
    script.write_text("#!/usr/bin/python3\n")
    path = write(tmp_path, f"[status]\nuids = [0]\n[[rules]]\nuids = [0]\nexecutables = ['{script}']\n")
    broker = broker_factory("--config", path)
    assert f"rules[0].executables: {script} is a script" in broker.log.read_text()


def test_a_refusal_names_each_allowed_principal_once() -> None:
    """Two rules for one uid (one per channel) used to list it twice."""
    from shmbroker._broker.policy import Policy, Principals, Rule

    alice = Principals(uids=frozenset({1000}))
    policy = Policy(rules=(Rule(alice, None, ("a",)), Rule(alice, None, ("b",))), status=Principals())
    with pytest.raises(PermissionDenied) as exc:
        policy.check_connect(1001, 1001, ())
    assert str(exc.value).count("allowed uids: 1000") == 1, exc.value
