"""The system broker (issue 15): clients of any uid find it without being
told, the path they fall back to passes the same trust checks as any other,
and root and an operator group may inspect it.  Real brokers, real uids."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adversary import write_config
from helpers import NOBODY, ChildError, fork_broker, stop_forked as _stop
from shmbroker import ShmClient
from shmbroker._paths import SYSTEM_SOCKET
from shmbroker._sys import prctl as sysprctl

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run brokers and clients as other uids")

# Ids nothing on a test machine uses (below nobody's 65534).
SOCKET_GROUP = 64010
OPERATOR_GROUP = 64011
OPERATOR = 64012
MEMBER = 64013  # in the socket group only
PR_SET_KEEPCAPS = 8  # include/uapi/linux/prctl.h


def as_user(fn: Callable[[], Any], uid: int, groups: list[int], env: dict[str, str | None] | None = None) -> Any:
    """Run ``fn`` in a forked child as ``uid`` with these supplementary groups."""
    import pickle

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            for key, value in (env or {}).items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            os.setgroups(groups)
            os.setgid(uid)
            os.setuid(uid)
            result: Any = ("ok", fn())
        except BaseException as exc:
            result = ("err", type(exc).__name__, str(exc), traceback.format_exc())
        with os.fdopen(w, "wb") as f:
            f.write(pickle.dumps(result))
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    result = pickle.loads(data)
    if result[0] == "err":
        raise ChildError(*result[1:])
    return result[1]


def _fork_broker(socket: str, config: str, log: Path, *, uid: int | None, groups: list[int]) -> int:
    """`shmbroker serve` as ``uid`` in a forked child."""
    def become() -> None:
        if uid is not None:
            # As systemd's User= with AmbientCapabilities=CAP_SYS_PTRACE:
            # keep the capabilities across setuid; harden_process then
            # cuts them to CAP_SYS_PTRACE, which verifying peers of other
            # uids needs.
            sysprctl.prctl(PR_SET_KEEPCAPS, 1)
            os.setgroups(groups)
            os.setgid(uid)
            os.setuid(uid)
            _, permitted, _ = sysprctl.get_caps()
            sysprctl.set_caps(permitted, permitted, 0)  # effective, as ambient capabilities are

    return fork_broker(
        ["serve", "--socket", socket, "--config", config, "-v"], log,
        become=become, started=lambda: "listening on" in log.read_text(),
    )


@pytest.fixture
def nobody_broker(short_tmp: Path) -> Iterator[str]:
    """A broker as nobody whose socket group admits OPERATOR and MEMBER;
    only OPERATOR is in its operator group, and no rule names either."""
    home = short_tmp / "nb"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    config = write_config(short_tmp, (
        f"[broker]\nsocket_group = {SOCKET_GROUP}\noperator_group = {OPERATOR_GROUP}\n"
        f"[[rules]]\nuids = [{NOBODY}]\n"
    ))
    socket = str(home / "run" / "broker.sock")
    pid = _fork_broker(socket, config, short_tmp / "nb.log", uid=NOBODY, groups=[SOCKET_GROUP])
    yield socket
    _stop(pid)


def test_root_may_query_the_status_of_a_broker_of_another_uid(nobody_broker: str) -> None:
    status = ShmClient.status(socket_path=nobody_broker, broker_uid=NOBODY)
    assert status["broker"]["uid"] == NOBODY
    assert status["confinement"]["user"]["euid"] == NOBODY


def test_the_operator_group_may_query_status_and_other_members_of_the_socket_group_may_not(nobody_broker: str) -> None:
    def status() -> int:
        return int(ShmClient.status(socket_path=nobody_broker, broker_uid=NOBODY)["broker"]["pid"])

    assert as_user(status, OPERATOR, [SOCKET_GROUP, OPERATOR_GROUP]) > 0
    with pytest.raises(ChildError) as refused:
        as_user(status, MEMBER, [SOCKET_GROUP])
    assert refused.value.type_name == "PermissionDenied"
    assert f"uid {MEMBER}" in refused.value.message
    events = ShmClient.status(socket_path=nobody_broker, broker_uid=NOBODY)["security_events"]
    assert any(e["kind"] == "peer_rejected" and e["uid"] == MEMBER for e in events)


# -- the fallback path -------------------------------------------------------
@pytest.fixture
def system_socket_free() -> Iterator[None]:
    if os.path.lexists(os.path.dirname(SYSTEM_SOCKET)):
        pytest.skip(f"{os.path.dirname(SYSTEM_SOCKET)} exists on this machine: a real system broker may use it")
    yield
    assert not os.path.lexists(os.path.dirname(SYSTEM_SOCKET)), "the test broker left its directory behind"


def _attach_without_a_socket_path() -> None:
    with ShmClient.attach("sys", "producer", size=4096) as p:
        p.buf[:2] = b"ok"


@pytest.mark.parametrize("runtime_dir", ["unset", "without a broker"])
def test_a_client_of_another_uid_falls_back_to_the_system_broker(
    system_socket_free: None, short_tmp: Path, runtime_dir: str,
) -> None:
    config = write_config(short_tmp, f"[broker]\nsocket_group = {SOCKET_GROUP}\n[[rules]]\nuids = [{MEMBER}]\ncreate = true\n")
    pid = _fork_broker(SYSTEM_SOCKET, config, short_tmp / "sys.log", uid=None, groups=[])
    try:
        xdg = short_tmp / "xdg"
        xdg.mkdir(mode=0o700)
        os.chown(xdg, MEMBER, MEMBER)
        env = {"SHMBROKER_SOCKET": None, "SHMBROKER_BROKER_USER": None,
               "XDG_RUNTIME_DIR": None if runtime_dir == "unset" else str(xdg)}
        as_user(_attach_without_a_socket_path, MEMBER, [SOCKET_GROUP], env)
        attaches = ShmClient.status(socket_path=SYSTEM_SOCKET)["counters"].get("attaches", 0)
        assert attaches == 1
    finally:
        _stop(pid)


def test_the_fallback_path_must_pass_the_trust_checks(system_socket_free: None, short_tmp: Path) -> None:
    """A broker of an untrusted uid at the system path (nobody, here) gets no
    client that fell back to it: the fallback is a default, not a pass."""
    directory = os.path.dirname(SYSTEM_SOCKET)
    os.mkdir(directory, 0o700)
    try:
        os.chown(directory, NOBODY, NOBODY)
        config = write_config(short_tmp, f"[[rules]]\nuids = [{MEMBER}]\ncreate = true\n")
        pid = _fork_broker(SYSTEM_SOCKET, config, short_tmp / "impostor.log", uid=NOBODY, groups=[])
        try:
            # Anyone may reach and connect: only the trust check stands in the way.
            os.chmod(directory, 0o711)
            os.chmod(SYSTEM_SOCKET, 0o666)
            env = {"SHMBROKER_SOCKET": None, "SHMBROKER_BROKER_USER": None, "XDG_RUNTIME_DIR": None}
            with pytest.raises(ChildError) as refused:
                as_user(_attach_without_a_socket_path, MEMBER, [], env)
            assert refused.value.type_name == "UntrustedBroker"
            assert SYSTEM_SOCKET in refused.value.message
            assert f"{NOBODY}" in refused.value.message
        finally:
            _stop(pid)
    finally:
        for path in (SYSTEM_SOCKET, os.path.dirname(SYSTEM_SOCKET)):
            try:
                (os.rmdir if path.endswith("shmbroker") else os.unlink)(path)
            except FileNotFoundError:
                pass


def test_no_broker_anywhere_names_every_place_it_looked(system_socket_free: None, short_tmp: Path) -> None:
    def attach() -> None:
        ShmClient.attach("x", "producer", size=4096)

    env = {"SHMBROKER_SOCKET": None, "XDG_RUNTIME_DIR": str(short_tmp)}
    with pytest.raises(ChildError) as missing:
        as_user(attach, MEMBER, [], env)
    assert missing.value.type_name == "BrokerUnavailable"
    assert f"{short_tmp}/shmbroker/broker.sock and {SYSTEM_SOCKET}" in missing.value.message
    assert "SHMBROKER_SOCKET" in missing.value.message
