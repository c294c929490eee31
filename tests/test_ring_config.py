"""Ring channels in the config file: validated like every other key, and usable live."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from shmbroker import ShmClient
from shmbroker._broker.config import load_config
from shmbroker.errors import ConfigError

RULES = f"""
[[rules]]
uids = [{os.getuid()}]
create = true
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "broker.toml"
    path.write_text(text + RULES)
    return str(path)


def test_ring_channel_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[channels.events]\nsize = "1MiB"\nring = true\nmax_message = "64KiB"\n'))
    spec = cfg.channels["events"]
    assert spec.ring and spec.max_message == 64 * 1024
    default = load_config(write(tmp_path, '[channels.small]\nsize = "16KiB"\nring = true\n'))
    assert default.channels["small"].max_message == (16 * 1024) // 4 - 8  # a quarter of the data area


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('size = "1MiB"\nring = "yes"', "channels.events.ring: must be true or false"),
        ('size = "1MiB"\nmax_message = "4KiB"', "channels.events.max_message: only ring channels have messages"),
        ('size = "1MiB"\nring = true\nmax_message = "lots"', "channels.events.max_message: 'lots' is not a size"),
        ('size = "1MiB"\nring = true\nmax_message = "2MiB"', "channels.events.max_message: max_message 2097152 does not fit"),
        ('size = 4000\nring = true', "channels.events.size: a ring needs a payload of at least 4096 bytes"),
    ],
)
def test_bad_ring_config_names_file_key_and_reason(tmp_path: Path, body: str, message: str) -> None:
    path = write(tmp_path, f"[channels.events]\n{body}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {message}")


def test_configured_ring_channel_works(broker_factory: Any, tmp_path: Path) -> None:
    path = write(tmp_path, '[channels.events]\nsize = "256KiB"\nring = true\nmax_message = 1000\n')
    broker = broker_factory("--config", path)
    with ShmClient.attach("events", "consumer", socket_path=broker.socket) as c, ShmClient.attach(
        "events", "producer", socket_path=broker.socket
    ) as p:
        assert p.max_message == 1000
        p.send(b"configured")
        assert c.recv(timeout=5) == b"configured"
        status = broker.status()["channels"][0]
        assert status["ring"] is True and status["max_message"] == 1000
