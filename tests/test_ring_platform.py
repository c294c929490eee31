"""Which ring implementation an attachment gets: the C core by default, the
pure-Python reference only where its memory-ordering argument holds."""

from __future__ import annotations

from typing import Any

import pytest

from shmbroker import ShmClient, errors
from shmbroker._ring import native
from shmbroker._ring.ring import RingConsumer, RingProducer

KiB = 1024


def test_rings_use_the_c_core_by_default(broker: Any) -> None:
    assert native.available(), "shmbroker._ring_native is not built; `make test` builds it"
    with ShmClient.attach("r", "producer", socket_path=broker.socket, size=64 * KiB, ring=True) as p, \
            ShmClient.attach("r", "consumer", socket_path=broker.socket) as c:
        assert type(p._ring.ring) is native.NativeRingProducer  # type: ignore[union-attr]
        assert type(c._ring.ring) is native.NativeRingConsumer  # type: ignore[union-attr]
        p.send(b"native")
        assert c.recv(timeout=5) == b"native"


def test_without_the_extension_x86_64_falls_back_to_python(broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulates a missing extension (the module stays loaded; the override
    makes the client act as if it were not)."""
    monkeypatch.setattr(native, "_native_override", False)
    monkeypatch.setattr(native, "_machine_override", "x86_64")
    with ShmClient.attach("r", "producer", socket_path=broker.socket, size=64 * KiB, ring=True) as p, \
            ShmClient.attach("r", "consumer", socket_path=broker.socket) as c:
        assert type(p._ring.ring) is RingProducer  # type: ignore[union-attr]
        assert type(c._ring.ring) is RingConsumer  # type: ignore[union-attr]
        p.send(b"python")
        assert c.recv(timeout=5) == b"python"


@pytest.mark.parametrize("machine", ["aarch64", "ppc64le", "riscv64"])
def test_without_the_extension_other_cpus_refuse_rings_but_not_raw_channels(
    broker: Any, monkeypatch: pytest.MonkeyPatch, machine: str
) -> None:
    """Simulates the CPU: this runs on x86-64, and the private hook makes
    the client believe platform.machine() said ``machine``; the refusal
    path itself is the real one an aarch64 client without the extension
    takes."""
    keeper = ShmClient.attach("r", "producer", socket_path=broker.socket, size=64 * KiB, ring=True)
    with ShmClient.attach("r", "consumer", socket_path=broker.socket) as bystander:
        keeper.close()  # the bystander keeps the channel; its producer slot is free
        monkeypatch.setattr(native, "_native_override", False)
        monkeypatch.setattr(native, "_machine_override", machine)
        for role in ("producer", "consumer"):
            with pytest.raises(errors.UnsupportedPlatform, match=rf"\({machine}\) need shmbroker's C extension.*gcc"):
                ShmClient.attach("r", role, socket_path=broker.socket)
        with ShmClient.attach("raw", "producer", socket_path=broker.socket, size=4 * KiB) as raw:
            raw.buf[:3] = b"raw"
        peers = [p["role"] for ch in broker.status()["channels"] if ch["name"] == "r" for p in ch["peers"]]
        assert peers == ["consumer"], "a refused attach left a peer behind"
        # With the extension, the same CPU gets the C core.
        monkeypatch.setattr(native, "_native_override", True)
        with ShmClient.attach("r", "producer", socket_path=broker.socket) as p:
            assert type(p._ring.ring) is native.NativeRingProducer  # type: ignore[union-attr]
            p.send(b"after")
        assert bystander.recv(timeout=5) == b"after"
