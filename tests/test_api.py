"""The public API as a new user meets it: types, help(), misuse, a dropped attachment."""

from __future__ import annotations

import asyncio
import gc
import inspect
import pydoc
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

import shmbroker
from conftest import wait_for
from shmbroker import Attachment, ShmClient, errors

ROOT = Path(__file__).resolve().parent.parent
KiB = 1024

PRODUCER_METHODS = {
    "send": (b"x",),
    "send_many": ([b"x"],),
    "reserve": (1,),
    "send_async": (b"x",),
}
CONSUMER_METHODS = {
    "recv": (),
    "recv_into": (bytearray(8),),
    "recv_many": (1,),
    "receive_view": (),
    "recv_async": (),
}


def call(att: Attachment, name: str, args: tuple[Any, ...]) -> None:
    result = getattr(att, name)(*args, timeout=0)
    if inspect.iscoroutine(result):
        asyncio.run(result)


def public_names(obj: Any) -> list[str]:
    return [n for n in dir(obj) if not n.startswith("_")]


@pytest.mark.parametrize("name", sorted(CONSUMER_METHODS))
def test_a_consumer_method_on_a_producer_names_the_misuse(broker: Any, name: str) -> None:
    with ShmClient.attach("r", "producer", socket_path=broker.socket, size=64 * KiB, ring=True) as p:
        with pytest.raises(errors.UnsupportedOperation, match=rf"^{name}\(\) is for consumers, but this attachment to channel 'r' is a producer; attach as 'consumer'"):
            call(p, name, CONSUMER_METHODS[name])


@pytest.mark.parametrize("name", sorted(PRODUCER_METHODS))
def test_a_producer_method_on_a_consumer_names_the_misuse(broker: Any, name: str) -> None:
    with ShmClient.attach("r", "producer", socket_path=broker.socket, size=64 * KiB, ring=True), \
            ShmClient.attach("r", "consumer", socket_path=broker.socket) as c:
        with pytest.raises(errors.UnsupportedOperation, match=rf"^{name}\(\) is for producers, but this attachment to channel 'r' is a consumer; attach as 'producer'"):
            call(c, name, PRODUCER_METHODS[name])


def test_every_message_method_on_a_raw_channel_names_the_misuse(broker: Any) -> None:
    with ShmClient.attach("raw", "producer", socket_path=broker.socket, size=4096) as p:
        for name, args in {**PRODUCER_METHODS, **CONSUMER_METHODS}.items():
            with pytest.raises(errors.UnsupportedOperation, match=rf"^{name}\(\) needs a ring channel, but 'raw' is a raw channel: .*\.buf"):
                call(p, name, args)
    # A mistake in the caller's code, so also what Python raises for one:
    assert issubclass(errors.UnsupportedOperation, ValueError)
    assert issubclass(errors.UnsupportedOperation, errors.ShmBrokerError)


def test_every_public_name_has_a_docstring_help_shows() -> None:
    undocumented = []
    for name in shmbroker.__all__:
        obj = getattr(shmbroker, name)
        if not (obj.__doc__ or "").strip() or obj.__doc__ == type(obj).__doc__:
            undocumented.append(f"shmbroker.{name}")
    for name in errors.__all__:
        if getattr(errors, name).__doc__ is None:
            undocumented.append(f"errors.{name}")
    for cls in (Attachment, ShmClient):
        for name in public_names(cls):
            if not (inspect.getdoc(getattr(cls, name)) or "").strip():
                undocumented.append(f"{cls.__name__}.{name}")
    assert undocumented == []
    text = pydoc.render_doc(Attachment, renderer=pydoc.plaintext)
    for attribute in ("buf", "size", "channel", "role", "generation", "send_async", "recv_async"):
        assert re.search(rf"\n \|  (async )?{attribute}\b", text), f"help(Attachment) does not list {attribute}"
    assert "Payload bytes of the segment" in text
    assert "._ring." not in Attachment.__doc__, "the class docstring must not send readers to a private module"
    assert "How a peer attaches" in pydoc.render_doc(shmbroker.Role, renderer=pydoc.plaintext)


def test_the_ring_fast_paths_carry_the_methods_docstrings(broker: Any) -> None:
    """An attachment binds the endpoint's methods over its own for speed;
    help(att.send) and att.send.__doc__ must still document them."""
    with ShmClient.attach("r", "producer", socket_path=broker.socket, size=64 * KiB, ring=True) as p, \
            ShmClient.attach("r", "consumer", socket_path=broker.socket) as c:
        for att in (p, c):
            shadowed = set(vars(att)) & set(public_names(Attachment))
            assert shadowed, "the fast paths are no longer bound; this test no longer tests them"
            for name in public_names(Attachment):
                if callable(getattr(att, name)):
                    doc = getattr(att, name).__doc__
                    assert doc and doc == getattr(Attachment, name).__doc__, f"{att.role}.{name}"
            assert "Copy ``data`` into the ring" in pydoc.render_doc(p.send, renderer=pydoc.plaintext)


def test_a_dropped_attachment_warns_with_its_channel_and_is_closed(broker: Any) -> None:
    att = ShmClient.attach("dropped", "producer", socket_path=broker.socket, size=4096)
    assert [p["role"] for p in broker.status()["channels"][0]["peers"]] == ["producer"]
    with pytest.warns(ResourceWarning, match=r"unclosed attachment to channel 'dropped' \(producer, generation 1\)"):
        del att
        gc.collect()
    # Closed by the finalizer: the broker saw the peer go (and wiped the segment).
    wait_for(lambda: not broker.status()["channels"] or not broker.status()["channels"][0]["peers"], what="detach")


def test_a_closed_attachment_is_not_warned_about(broker: Any) -> None:
    att = ShmClient.attach("closed", "producer", socket_path=broker.socket, size=4096)
    att.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        del att
        gc.collect()


def test_the_status_types_describe_what_the_broker_sends(broker: Any) -> None:
    """Exactly the keys, both ways: a key the broker adds or drops must show up
    in shmbroker.Status too (the broker's loop builds the dict on its own)."""
    with ShmClient.attach("typed", "producer", socket_path=broker.socket, size=4096):
        status = ShmClient.status(socket_path=broker.socket)
    assert set(status) == set(shmbroker.Status.__annotations__)
    assert set(status["broker"]) == set(shmbroker.StatusBroker.__annotations__)
    channel = status["channels"][0]
    assert set(channel) == set(shmbroker.StatusChannel.__annotations__)
    assert set(channel["peers"][0]) == set(shmbroker.StatusPeer.__annotations__)
    from shmbroker._broker.events import EventKind, SecurityEvent

    event = SecurityEvent(kind=EventKind.PEER_REJECTED, time=0.0, pid=1, uid=2, detail="x").as_dict()
    assert set(event) == set(shmbroker.StatusEvent.__annotations__)


def test_a_misspelled_role_is_a_value_error_at_run_time() -> None:
    with pytest.raises(ValueError, match="role must be 'producer' or 'consumer', not 'consumr'"):
        ShmClient.attach("frames", "consumr")  # type: ignore[arg-type]


def test_mypy_rejects_a_misspelled_role(tmp_path: Path) -> None:
    """``role`` is a Literal: a typo is caught before the program runs."""
    source = tmp_path / "typo.py"
    source.write_text(
        "from shmbroker import ShmClient, Status\n"
        "att = ShmClient.attach('frames', 'consumr')\n"
        "status: Status = ShmClient.status()\n"
        "reveal_type(status['channels'][0]['peers'][0]['role'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--config-file", "/dev/null", str(source)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert 'Argument 2 to "attach" of "ShmClient" has incompatible type "Literal[\'consumr\']"' in proc.stdout, proc.stdout
    assert "Literal['producer', 'consumer']" in proc.stdout
