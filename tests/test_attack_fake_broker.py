"""T1: a broker run by someone else (issue 12, point 1).

Another uid that can create the socket's directory (a fixed name in /tmp,
say) can run its own broker there.  It passes every check a client makes
of the segment (nlink 0, mode 0, a sealed memfd, a valid header), so
producers would write their secrets into the attacker's memory and
consumers would read the attacker's messages.  Clients therefore check,
before sending a single byte, that the socket path and the process
listening on it belong to root, themselves, the shmbroker user, or the
uid they were told to expect (``broker_uid=``, ``SHMBROKER_BROKER_USER``,
``[broker] user``).

Everything here is real: the attacker is another uid (nobody) with its own
processes, directories and sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adversary import policy_toml, write_config
from helpers import NOBODY, ChildError, run_in_child
from impostor import attacker_dir, broker_as, recording_fake, remove_tree
from shmbroker import ShmClient, errors

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run processes as other uids")
OTHER_UID = 4243  # a second ordinary user, with no passwd entry
WAIT = 1.0  # a client that trusts a silent fake gives up after this long


def refusal(fn: Callable[[], Any]) -> errors.ShmBrokerError:
    """The error ``fn`` raised; fails the test if it succeeded (it talked to the attacker)."""
    try:
        result = fn()
    except errors.ShmBrokerError as exc:
        return exc
    if hasattr(result, "close"):
        result.close()
    pytest.fail(f"the client accepted a broker run by another uid: {result!r}")


def child_refusal(fn: Callable[[], Any], *, uid: int) -> tuple[str, str]:
    """(error type, message) from ``fn`` run as ``uid``; fails if it succeeded."""
    try:
        result = run_in_child(fn, uid=uid, gid=uid)
    except ChildError as exc:
        return exc.type_name, exc.message
    pytest.fail(f"a client of uid {uid} accepted a broker run by another uid: {result!r}")


@pytest.fixture
def evil_dir() -> Iterator[Path]:
    path = attacker_dir(NOBODY, NOBODY)
    yield path
    remove_tree(path)


@ROOT_ONLY
def test_a_fake_broker_of_another_uid_receives_not_one_byte_from_root(evil_dir: Path) -> None:
    """nobody owns /tmp/shmb-evil-*/ and listens there; root's producer refuses
    before connecting, so its request (channel, role, size) never leaves."""
    path = str(evil_dir / "broker.sock")
    with recording_fake(path, uid=NOBODY, gid=NOBODY) as fake:
        producer = refusal(lambda: ShmClient.attach("secrets", "producer", size=4096, socket_path=path, timeout=WAIT))
        consumer = refusal(lambda: ShmClient.attach("secrets", "consumer", socket_path=path, timeout=WAIT))
        status = refusal(lambda: ShmClient.status(socket_path=path, timeout=WAIT))
    assert fake.stop().bytes == 0, f"the fake broker received {fake.stop().bytes} bytes"
    for exc in (producer, consumer, status):
        assert isinstance(exc, errors.UntrustedBroker), repr(exc)
        assert str(evil_dir) in str(exc) and f"uid {NOBODY}" in str(exc)
        assert "broker_uid=65534" in str(exc) and "SHMBROKER_BROKER_USER" in str(exc)


@ROOT_ONLY
def test_a_fake_broker_of_another_uid_receives_not_one_byte_from_a_second_user(evil_dir: Path) -> None:
    path = str(evil_dir / "broker.sock")
    with recording_fake(path, uid=NOBODY, gid=NOBODY) as fake:
        kind, message = child_refusal(
            lambda: ShmClient.attach("secrets", "producer", size=4096, socket_path=path, timeout=WAIT), uid=OTHER_UID,
        )
    assert fake.stop().bytes == 0, f"the fake broker received {fake.stop().bytes} bytes"
    assert kind == "UntrustedBroker", message
    assert str(evil_dir) in message and f"uid {NOBODY}" in message


@ROOT_ONLY
def test_an_impostor_running_the_real_broker_code_gets_no_producer_and_no_consumer(evil_dir: Path, short_tmp: Path) -> None:
    """The attacker runs shmbroker itself (admitting anyone) in its own
    directory: its segments would pass every client check, so only the
    trust check can stop a producer handing it data, or a consumer reading
    what it forged."""
    path = str(evil_dir / "run" / "broker.sock")
    config = write_config(short_tmp, policy_toml(uids=(0, OTHER_UID, NOBODY), executables=None))
    with broker_as(path, config, short_tmp / "impostor.log", uid=NOBODY, gid=NOBODY, verify_peers=False):
        producer = refusal(lambda: ShmClient.attach("secrets", "producer", size=4096, socket_path=path))
        consumer = refusal(lambda: ShmClient.attach("secrets", "consumer", socket_path=path))
        # Asked knowingly (broker_uid=), the impostor says what it got: nothing.
        seen = ShmClient.status(socket_path=path, broker_uid=NOBODY)
    for exc in (producer, consumer):
        assert isinstance(exc, errors.UntrustedBroker), repr(exc)
    assert seen["channels"] == []
    assert seen["counters"].get("attaches", 0) == 0
    # The two refused clients never connected: the path check came first.
    assert seen["counters"].get("connections_accepted", 0) == 1, seen["counters"]


@ROOT_ONLY
def test_the_process_listening_must_be_trusted_not_only_the_path(short_tmp: Path) -> None:
    """Every directory and the socket file are root's, but the process that
    called listen() on it runs as nobody: SO_PEERCRED names nobody, and the
    client hangs up without sending anything."""
    directory = short_tmp / "handed"
    directory.mkdir(mode=0o755)
    path = str(directory / "broker.sock")
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound.bind(path)
    os.chmod(path, 0o666)
    try:
        with recording_fake(path, uid=NOBODY, gid=NOBODY, bound=bound) as fake:
            bound.close()
            exc = refusal(lambda: ShmClient.attach("secrets", "producer", size=4096, socket_path=path, timeout=WAIT))
            got = fake.stop()
    finally:
        bound.close()
    assert got.bytes == 0, f"the fake broker received {got.bytes} bytes"
    assert got.connections == 1, "the client should have connected and then checked SO_PEERCRED"
    assert isinstance(exc, errors.UntrustedBroker), repr(exc)
    assert f"runs as uid {NOBODY}" in str(exc) and path in str(exc) and "broker_uid=65534" in str(exc)


@pytest.fixture
def nobody_broker(short_tmp: Path) -> Iterator[str]:
    """A legitimate broker run as nobody (with CAP_SYS_PTRACE, like the
    systemd unit), in a directory of nobody's, admitting root."""
    home = short_tmp / "nb"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    path = str(home / "run" / "broker.sock")
    config = write_config(short_tmp, policy_toml(uids=(0,), executables=None))
    with broker_as(path, config, short_tmp / "nobody-broker.log", uid=NOBODY, gid=NOBODY):
        yield path


@ROOT_ONLY
def test_a_broker_of_another_uid_is_accepted_only_when_expected(nobody_broker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = nobody_broker
    exc = refusal(lambda: ShmClient.attach("shared", "producer", size=4096, socket_path=path))
    assert isinstance(exc, errors.UntrustedBroker) and f"uid {NOBODY}" in str(exc)
    # Told to expect another user, the client still refuses it.
    exc = refusal(lambda: ShmClient.attach("shared", "producer", size=4096, socket_path=path, broker_uid=OTHER_UID))
    assert isinstance(exc, errors.UntrustedBroker)
    for expected in (NOBODY, "nobody", str(NOBODY)):
        with ShmClient.attach("shared", "producer", size=4096, socket_path=path, broker_uid=expected) as att:
            att.buf[:2] = b"ok"
    monkeypatch.setenv("SHMBROKER_BROKER_USER", "nobody")
    with ShmClient.attach("shared", "producer", size=4096, socket_path=path) as prod, \
            ShmClient.attach("shared", "consumer", socket_path=path) as cons:
        prod.buf[:5] = b"hello"
        assert bytes(cons.buf[:5]) == b"hello"
    assert ShmClient.status(socket_path=path)["broker"]["uid"] == NOBODY
    # The keyword wins over the environment.
    exc = refusal(lambda: ShmClient.status(socket_path=path, broker_uid=OTHER_UID))
    assert isinstance(exc, errors.UntrustedBroker)
    monkeypatch.setenv("SHMBROKER_BROKER_USER", "no-such-user-xyz")
    with pytest.raises(errors.ConfigError, match="SHMBROKER_BROKER_USER='no-such-user-xyz': no such user"):
        ShmClient.status(socket_path=path)
    with pytest.raises(ValueError, match="broker_uid='no-such-user-xyz'"):
        ShmClient.status(socket_path=path, broker_uid="no-such-user-xyz")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    run_env = {k: v for k, v in os.environ.items() if k != "SHMBROKER_BROKER_USER"}
    return subprocess.run(
        [sys.executable, "-m", "shmbroker", *args], capture_output=True, text=True, timeout=60, env={**run_env, **(env or {})},
    )


@ROOT_ONLY
def test_status_cli_checks_the_broker_user(nobody_broker: str, short_tmp: Path) -> None:
    path = nobody_broker
    refused = _cli("status", "--socket", path)
    assert refused.returncode == 1, refused.stdout
    assert "refusing to connect" in refused.stderr and f"uid {NOBODY}" in refused.stderr
    assert "Traceback" not in refused.stderr
    told = _cli("status", "--socket", path, "--broker-user", "nobody")
    assert told.returncode == 0, told.stderr
    assert f"uid {NOBODY}" in told.stdout
    assert _cli("status", "--socket", path, env={"SHMBROKER_BROKER_USER": str(NOBODY)}).returncode == 0
    config = write_config(
        short_tmp, f'[broker]\nuser = "nobody"\nsocket = "{path}"\n' + policy_toml(uids=(0,), executables=None),
        name="status.toml",
    )
    from_config = _cli("status", "--config", config)
    assert from_config.returncode == 0, from_config.stderr
    wrong = _cli("status", "--socket", path, "--broker-user", str(OTHER_UID))
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    unknown = _cli("status", "--socket", path, "--broker-user", "no-such-user-xyz")
    assert unknown.returncode == 2 and "--broker-user no-such-user-xyz: no such user" in unknown.stderr
    assert "Traceback" not in unknown.stderr


@ROOT_ONLY
def test_a_client_told_the_brokers_user_refuses_even_its_own_uid(evil_dir: Path) -> None:
    """An explicit expectation replaces the default set: a client told (by
    SHMBROKER_BROKER_USER) that the broker is uid 4243 refuses a broker of
    its own uid (nobody here), whose path it trusts, on the uid found by
    SO_PEERCRED."""
    path = str(evil_dir / "broker.sock")

    def attach() -> Any:
        os.environ["SHMBROKER_BROKER_USER"] = str(OTHER_UID)
        return ShmClient.attach("x", "producer", size=4096, socket_path=path, timeout=WAIT)

    with recording_fake(path, uid=NOBODY, gid=NOBODY) as fake:
        kind, message = child_refusal(attach, uid=NOBODY)
        got = fake.stop()
    assert got.bytes == 0 and got.connections == 1, got
    assert kind == "UntrustedBroker" and f"runs as uid {NOBODY}" in message, message


@ROOT_ONLY
def test_serve_refuses_to_run_as_another_user_than_its_config_names(short_tmp: Path) -> None:
    config = write_config(short_tmp, '[broker]\nuser = "nobody"\n' + policy_toml(uids=(0,), executables=None))
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmbroker", "serve", "--config", config, "--socket", str(short_tmp / "s" / "b.sock")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the broker started as root although its config says it runs as nobody")
    assert proc.returncode == 2, err
    assert f"{config}: broker.user: this broker runs as uid 0 (root)" in err and f"{NOBODY} (nobody)" in err
    assert "Traceback" not in err


@ROOT_ONLY
def test_a_socket_under_another_uids_private_directory_is_called_untrusted_not_a_permission_problem(evil_dir: Path) -> None:
    """Found by a red team: a client that could not search another uid's 0700
    directory was told to ask for the socket group (PermissionDenied), when
    the answer is that uid could put any broker there (UntrustedBroker)."""
    os.chmod(evil_dir, 0o700)
    path = str(evil_dir / "broker.sock")
    kind, message = child_refusal(lambda: ShmClient.attach("secrets", "consumer", socket_path=path, timeout=WAIT), uid=OTHER_UID)
    assert kind == "UntrustedBroker", message
    assert str(evil_dir) in message and f"uid {NOBODY}" in message
