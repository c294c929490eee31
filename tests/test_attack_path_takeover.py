"""T1: taking over the socket path from above (issue 12, point 1).

Whoever owns (or may write) a directory above the broker's socket
directory can rename that directory away while a real broker runs and put
their own broker at the same path.  The broker therefore refuses to start
under such a directory, and clients refuse to connect through one, whoever
listens at the end of it."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import NOBODY, BrokerProc
from impostor import drop_to, recording_fake
from shmbroker import ShmClient, errors

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run processes as other uids")
START_TIMEOUT = 15.0


def serve_refusal(socket_path: Path) -> str:
    """stderr of `shmbroker serve` refusing ``socket_path``; fails if it serves."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmbroker", "serve", "--socket", str(socket_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        _, err = proc.communicate(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"the broker started on {socket_path} under a directory another uid controls")
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    return err


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


@ROOT_ONLY
@pytest.mark.parametrize("owner, mode, expect", [
    (NOBODY, 0o755, f"belongs to uid {NOBODY} (nobody) (mode 0755)"),
    (0, 0o777, "is writable by everyone and has no sticky bit (mode 0777"),
    (0, 0o775, "is writable by group"),
])
def test_broker_refuses_a_socket_under_a_directory_others_control(short_tmp: Path, owner: int, mode: int, expect: str) -> None:
    parent = short_tmp / "home"
    parent.mkdir()
    # The socket directory is root's already (left by an earlier run, or made
    # by the operator): the broker's check of that last directory passes.
    (parent / "run").mkdir(mode=0o700)
    os.chown(parent, owner, NOBODY)
    parent.chmod(mode)
    err = serve_refusal(parent / "run" / "broker.sock")
    assert f"refusing to serve on {parent}/run/broker.sock: {parent} {expect}" in err, err
    assert "rename the socket directory away" in err
    assert not (parent / "run" / "broker.sock").exists()


@ROOT_ONLY
def test_broker_serves_under_a_sticky_directory_like_tmp_but_not_a_plain_shared_one(
    short_tmp: Path, broker_at: Callable[[Path], BrokerProc],
) -> None:
    """/tmp's rule: a world-writable directory is refused unless it is
    sticky; then the broker's own directory in it is the broker's, and
    others can neither rename nor remove it.  A directory someone else made
    there under the broker's chosen name is refused as well."""
    shared = short_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    err = serve_refusal(shared / "mine" / "broker.sock")
    assert f"{shared} is writable by everyone and has no sticky bit" in err
    shared.chmod(0o1777)
    squatted = shared / "squat"
    pid = os.fork()
    if pid == 0:
        try:
            drop_to(NOBODY, NOBODY)
            os.mkdir(squatted, 0o700)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    err = serve_refusal(squatted / "broker.sock")
    assert f"socket directory {squatted} belongs to uid {NOBODY}" in err
    b = broker_at(shared / "mine" / "broker.sock")
    with ShmClient.attach("t", size=4096, socket_path=str(shared / "mine" / "broker.sock")) as att:
        assert att.size == 4096
    assert b.proc.poll() is None


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


def test_a_path_through_a_file_gives_clean_errors_not_tracebacks(short_tmp: Path) -> None:
    """A component that is not a directory (what a path swapped while it is
    being checked looks like, too) is a plain error for the client, the
    broker and the config loader, never an OSError traceback."""
    plain = short_tmp / "plain"
    plain.write_text("not a directory\n")
    with pytest.raises(errors.BrokerUnavailable):
        ShmClient.status(socket_path=str(plain / "broker.sock"))
    serve = subprocess.run(
        [sys.executable, "-m", "shmbroker", "serve", "--socket", str(plain / "run" / "broker.sock")],
        capture_output=True, text=True, timeout=60,
    )
    assert serve.returncode == 2 and f"{plain}: Not a directory" in serve.stderr, serve.stderr
    status = subprocess.run(
        [sys.executable, "-m", "shmbroker", "status", "--config", str(plain / "broker.toml")],
        capture_output=True, text=True, timeout=60,
    )
    assert status.returncode == 2 and f"{plain}/broker.toml: cannot read the config file" in status.stderr
    assert "Traceback" not in serve.stderr + status.stderr


def test_the_broker_never_chmods_a_shared_directory_it_did_not_make(broker_factory: Any, short_tmp: Path) -> None:
    """`serve --socket /tmp/broker.sock` as root used to chmod /tmp itself to
    0700: the socket directory was chmodded whoever had made it."""
    shared = short_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    proc = subprocess.run(
        [sys.executable, "-m", "shmbroker", "serve", "--socket", str(shared / "broker.sock")],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777, "the broker changed a directory it did not create"
    assert "already exists with mode 1777" in proc.stderr and str(shared / "shmbroker") in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
