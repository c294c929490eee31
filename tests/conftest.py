"""Shared fixtures: a real broker in a real subprocess, and helpers to run
code in forked children (optionally as another uid)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import BrokerProc, lasting_shm_objects, shm_leftovers  # noqa: E402


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: AF_UNIX paths are limited to 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="shmb-", dir="/tmp"))
    # Other-uid tests must be able to traverse to the broker's own directory,
    # which the broker itself keeps private.
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_broker(tmp: Path, *args: str, env: dict[str, str] | None = None, name: str = "run") -> BrokerProc:
    sock = tmp / name / "broker.sock"
    log = tmp / f"{name}-broker.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmbroker", "serve", "--socket", str(sock), "-v", *args],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
        env={**os.environ, **(env or {})},
    )
    broker = BrokerProc(proc=proc, socket=str(sock), log=log)
    try:
        broker.wait_ready()
    except BaseException:
        proc.kill()  # never leave a broker behind when a test gives up on it
        proc.wait()
        raise
    return broker


@pytest.fixture
def broker_factory(short_tmp: Path) -> Iterator[Any]:
    started: list[BrokerProc] = []

    def factory(*args: str, env: dict[str, str] | None = None, name: str = "run") -> BrokerProc:
        b = start_broker(short_tmp, *args, env=env, name=name)
        started.append(b)
        return b

    yield factory
    for b in started:
        if b.proc.poll() is None:
            b.proc.send_signal(signal.SIGTERM)
            try:
                b.proc.wait(10)
            except subprocess.TimeoutExpired:
                b.proc.kill()
                b.proc.wait()
                pytest.fail(f"broker did not stop on SIGTERM; log:\n{b.log.read_text()}")


@pytest.fixture
def broker(broker_factory: Any) -> Iterator[BrokerProc]:
    b = broker_factory()
    before = shm_leftovers()
    yield b
    b.proc.send_signal(signal.SIGTERM)
    code = b.proc.wait(10)
    assert code == 0, f"broker exited with {code}; log:\n{b.log.read_text()}"
    assert not os.path.exists(b.socket), "broker left its socket behind"
    assert lasting_shm_objects(before) == set(), "broker left segments in /dev/shm"


@pytest.fixture
def copied_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter copied to another inode: 'another executable' for policy
    purposes, yet able to run shmbroker (PYTHONHOME/PYTHONPATH set by env_for_copy)."""
    real = os.path.realpath(sys.executable)
    target = tmp_path_factory.mktemp("copied-python") / "python-copy"
    shutil.copy2(real, target)
    return target


def env_for_copy() -> dict[str, str]:
    import msgpack

    paths = [str(Path(__file__).resolve().parent.parent), str(Path(msgpack.__file__).parent.parent)]
    return {**os.environ, "PYTHONHOME": sys.base_prefix, "PYTHONPATH": os.pathsep.join(paths)}


def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(params=["native", "python"])
def ring_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a ring test against the C core and against the pure-Python
    reference, over the same shared layout.  The choice is made at attach
    time in this process and inherited by forked workers."""
    from shmbroker._ring import native

    if request.param == "native":
        assert native.available(), "shmbroker._ring_native is not built; `make test` builds it"
        monkeypatch.setattr(native, "_native_override", True)
    else:
        monkeypatch.setattr(native, "_native_override", False)
    return str(request.param)
