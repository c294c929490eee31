"""T1: taking over the socket path from above (issue 12, point 1).

Whoever owns (or may write) a directory above the broker's socket
directory can rename that directory away while a real broker runs and put
their own broker at the same path.  Clients therefore refuse to connect
through such a directory, whoever listens at the end of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import NOBODY, BrokerProc
from impostor import drop_to, recording_fake
from shmbroker import ShmClient, errors

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run processes as other uids")


@pytest.fixture
def broker_at(short_tmp: Path) -> Iterator[Callable[[Path], BrokerProc]]:
    """Start a real (root) broker on a socket path of the test's choosing."""
    started: list[BrokerProc] = []

    def start(socket_path: Path) -> BrokerProc:
        log = short_tmp / f"broker-{len(started)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "shmbroker", "serve", "--socket", str(socket_path), "-v"],
            stdout=subprocess.DEVNULL, stderr=open(log, "w"),
        )
        broker = BrokerProc(proc=proc, socket=str(socket_path), log=log)
        started.append(broker)
        broker.wait_ready()
        return broker

    yield start
    for broker in started:
        if broker.proc.poll() is None:
            broker.proc.send_signal(signal.SIGTERM)
            try:
                broker.proc.wait(10)
            except subprocess.TimeoutExpired:
                broker.proc.kill()
                broker.proc.wait()


def _untrusted_parent_with_a_real_broker(short_tmp: Path, broker_at: Callable[[Path], BrokerProc]) -> tuple[Path, BrokerProc]:
    """A real root broker whose socket directory's parent then passes to
    nobody (a home directory, a shared project directory...)."""
    parent = short_tmp / "p"
    parent.mkdir(mode=0o755)
    broker = broker_at(parent / "run" / "broker.sock")
    os.chown(parent, NOBODY, NOBODY)
    return parent, broker


@ROOT_ONLY
def test_client_refuses_a_real_broker_under_a_directory_another_uid_owns(
    short_tmp: Path, broker_at: Callable[[Path], BrokerProc],
) -> None:
    """The broker is root's and genuine, but nobody can swap it at any time:
    the client refuses the path (and so never relies on luck)."""
    parent, broker = _untrusted_parent_with_a_real_broker(short_tmp, broker_at)
    path = str(parent / "run" / "broker.sock")
    try:
        ShmClient.attach("t", "producer", size=4096, socket_path=path).close()
    except errors.ShmBrokerError as exc:
        refused = exc
    else:
        pytest.fail(f"the client attached through {parent}, which nobody owns and could swap at any time")
    assert isinstance(refused, errors.UntrustedBroker), repr(refused)
    message = str(refused)
    assert f"{parent} belongs to uid {NOBODY}" in message and path in message
    os.chown(parent, 0, 0)
    assert broker.status()["counters"].get("attaches", 0) == 0


@ROOT_ONLY
def test_renaming_the_socket_directory_away_does_not_hand_clients_to_the_attacker(
    short_tmp: Path, broker_at: Callable[[Path], BrokerProc],
) -> None:
    """The attack as filed: a real broker runs; the owner of a parent
    directory renames the broker's directory away and listens at the old
    path.  The client sends the attacker nothing."""
    parent, broker = _untrusted_parent_with_a_real_broker(short_tmp, broker_at)
    run = parent / "run"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            drop_to(NOBODY, NOBODY)
            os.rename(run, parent / "run.old")
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "nobody could not rename root's socket directory"
    path = str(run / "broker.sock")
    with recording_fake(path, uid=NOBODY, gid=NOBODY, make_dir=True) as fake:
        try:
            ShmClient.attach("t", "producer", size=4096, socket_path=path, timeout=1.0).close()
        except errors.ShmBrokerError as exc:
            refused = exc
        else:
            pytest.fail("the client attached through the attacker's directory")
        got = fake.stop()
    assert got.bytes == 0, f"the attacker's broker received {got.bytes} bytes"
    assert isinstance(refused, errors.UntrustedBroker), repr(refused)
    assert f"{parent} belongs to uid {NOBODY}" in str(refused)
    assert broker.proc.poll() is None


@ROOT_ONLY
def test_a_symlink_on_the_socket_path_is_judged_by_where_it_leads(
    short_tmp: Path, broker_at: Callable[[Path], BrokerProc],
) -> None:
    """Symlinks are resolved first, the resolved chain is checked, and the
    client connects to the resolved path: a root-owned link into nobody's
    directory is refused; nobody's link to root's broker leads to root's
    broker (nobody can retarget it, but only for later connections, which
    check again)."""
    evil = short_tmp / "evil"
    evil.mkdir()
    os.chown(evil, NOBODY, NOBODY)
    into_evil = short_tmp / "link"
    into_evil.symlink_to(evil)
    with recording_fake(str(evil / "broker.sock"), uid=NOBODY, gid=NOBODY) as fake:
        try:
            ShmClient.attach("t", "producer", size=4096, socket_path=str(into_evil / "broker.sock"), timeout=1.0).close()
        except errors.ShmBrokerError as exc:
            refused = exc
        else:
            pytest.fail("the client followed a symlink into nobody's directory")
        got = fake.stop()
    assert got.bytes == 0, f"the fake broker received {got.bytes} bytes"
    assert isinstance(refused, errors.UntrustedBroker), repr(refused)
    assert f"(resolved: {evil}/broker.sock)" in str(refused) and f"{evil} belongs to uid {NOBODY}" in str(refused)

    real = broker_at(short_tmp / "real" / "broker.sock")
    pid = os.fork()
    if pid == 0:
        try:
            drop_to(NOBODY, NOBODY)
            os.symlink(short_tmp / "real", evil / "to-real")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    with ShmClient.attach("t", "producer", size=4096, socket_path=str(evil / "to-real" / "broker.sock")) as att:
        assert att.size == 4096
    assert real.status()["counters"]["attaches"] == 1
