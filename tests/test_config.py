"""Config files are validated completely at startup; policy decisions are pure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shmbroker._broker.config import load_config, parse_size
from shmbroker._broker.policy import Identity, default_policy
from shmbroker.errors import ConfigError, PermissionDenied


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
        ("[limits]\nmax_frame_size = 0\n[[rules]]\nuids=[1]\n", "limits: max_frame_size must be positive"),
        ("[limits]\nmax_conections = 5\n[[rules]]\nuids=[1]\n", "limits: unknown limit 'max_conections'"),
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
