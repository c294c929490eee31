"""Landlock: the broker's filesystem sandbox and the exe inspector that keeps
peer verification working inside it.  Real kernel, no mocks."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from helpers import run_in_child
from shmbroker import ShmClient, errors
from shmbroker._broker import sandbox
from shmbroker._broker.inspector import ExeInspector
from shmbroker._sys import landlock
from shmbroker._sys import prctl as sysprctl

pytestmark = pytest.mark.skipif(
    landlock.abi_version() <= 0, reason="kernel without Landlock (needs 5.13+ with landlock in lsm=)"
)


def test_sandboxed_process_cannot_open_outside_its_paths(short_tmp: Path) -> None:
    sockdir = short_tmp / "run"
    sockdir.mkdir()
    outside = short_tmp / "outside.txt"
    outside.write_text("secret")

    def probe() -> dict[str, Any]:
        sysprctl.prctl(sysprctl.PR_SET_NO_NEW_PRIVS, 1)
        before = os.stat(f"/proc/{os.getppid()}/exe")
        inspector = ExeInspector.start()  # forked before restricting, as serve does
        abi = sandbox.restrict(socket_path=str(sockdir / "broker.sock"), config_path=None)
        result: dict[str, Any] = {"abi": abi}
        for name, path in (("outside", outside), ("etc", Path("/etc/hostname"))):
            try:
                open(path).close()
                result[name] = 0
            except OSError as exc:
                result[name] = exc.errno
        (sockdir / "inside").write_text("ok")  # its own directory stays writable
        result["inside"] = (sockdir / "inside").read_text()
        try:
            os.stat(f"/proc/{os.getppid()}/exe")
            result["proc_exe"] = 0
        except OSError as exc:
            result["proc_exe"] = exc.errno
        result["inspector"] = inspector.exe(os.getppid())[:2] == (before.st_dev, before.st_ino)
        inspector.close()
        return result

    result = run_in_child(probe)
    assert result["abi"] >= 1
    assert result["outside"] == errno.EACCES
    assert result["etc"] == errno.EACCES
    assert result["inside"] == "ok"
    # Landlock denies ptrace-mode access outside the sandbox, so the broker
    # itself could no longer verify any peer...
    assert result["proc_exe"] == errno.EACCES
    # ...which is why the unsandboxed inspector does it.
    assert result["inspector"] is True


def test_landlocked_broker_still_verifies_and_serves(broker_factory: Any) -> None:
    b = broker_factory("--landlock", "on")
    with ShmClient.attach("ll", "producer", socket_path=b.socket, size=4096) as p, \
         ShmClient.attach("ll", "consumer", socket_path=b.socket) as c:
        p.buf[:5] = b"hello"
        assert bytes(c.buf[:5]) == b"hello"
    log = b.log.read_text()
    assert "landlock ABI" in log and "exe inspector running" in log


def test_landlocked_broker_rejects_a_foreign_executable(broker_factory: Any, copied_python: Path) -> None:
    """The inspector's answer is used, not ignored: a peer running another
    executable is still refused under the default policy."""
    import subprocess

    from conftest import env_for_copy

    b = broker_factory("--landlock", "on")
    code = (
        "import sys; from shmbroker import ShmClient, errors\n"
        "try:\n ShmClient.attach('x', 'producer', socket_path=sys.argv[1], size=4096)\n"
        "except errors.PermissionDenied as e:\n print(e); sys.exit(3)\n"
    )
    out = subprocess.run([str(copied_python), "-c", code, b.socket], env=env_for_copy(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 3, out.stderr
    assert "permission denied" in out.stdout


def test_inspector_dies_with_the_broker(broker_factory: Any) -> None:
    import signal

    b = broker_factory("--landlock", "on")
    with open(f"/proc/{b.pid}/task/{b.pid}/children") as f:
        children = [int(x) for x in f.read().split()]
    assert len(children) == 1
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait()
    from conftest import wait_for

    wait_for(lambda: not os.path.exists(f"/proc/{children[0]}") or _state(children[0]) == "Z", what="inspector exit")


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_landlocked_broker_leaves_nothing_behind(broker_factory: Any) -> None:
    import signal

    b = broker_factory("--landlock", "on")
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(10) == 0
    assert not os.path.exists(os.path.dirname(b.socket)), "socket directory left behind"


def test_inspector_never_takes_a_late_answer_for_the_next_question() -> None:
    """After a timeout the answer for an earlier peer may still arrive; it must
    not be read as the answer about the next peer (found in review)."""
    import subprocess
    import sys

    from shmbroker._broker import inspector as insp

    other = subprocess.Popen(["sleep", "30"])
    ex = insp.ExeInspector.start()
    try:
        # A question whose answer nobody waited for, as after a timeout: about us.
        ex.sock.send(insp._REQUEST.pack(10_000, os.getpid()))
        dev, ino, path = ex.exe(other.pid)[:3]
        sleep_exe = os.stat(f"/proc/{other.pid}/exe")
        assert (dev, ino) == (sleep_exe.st_dev, sleep_exe.st_ino)
        assert (dev, ino) != (os.stat(sys.executable).st_dev, os.stat(sys.executable).st_ino)
    finally:
        ex.close()
        other.kill()
        other.wait()


def test_panic_signal_to_every_process_of_the_unit_spares_the_inspector(broker_factory: Any) -> None:
    """`systemctl kill -s USR1` signals every process of the service, the exe
    inspector too; it used to die of it, and every peer after the panic was
    then refused as unverifiable (found under a real systemd, issue 15)."""
    import signal

    from conftest import wait_for

    b = broker_factory("--landlock", "on")
    with open(f"/proc/{b.pid}/task/{b.pid}/children") as f:
        (inspector,) = [int(x) for x in f.read().split()]
    with ShmClient.attach("p", "producer", socket_path=b.socket, size=4096) as p:
        p.buf[:6] = b"secret"
        for pid in (inspector, b.pid):
            os.kill(pid, signal.SIGUSR1)
        wait_for(lambda: p.revoked, what="the panic wipe")
    for pid in (inspector, b.pid):
        os.kill(pid, signal.SIGHUP)
    assert _state(inspector) not in ("Z", "gone")
    with ShmClient.attach("p", "producer", socket_path=b.socket, size=4096) as p2, \
         ShmClient.attach("p", "consumer", socket_path=b.socket) as c:
        p2.buf[:2] = b"ok"
        assert bytes(c.buf[:2]) == b"ok"


def test_a_stalled_inspector_fails_its_questions_closed_and_the_broker_serves_on(broker_factory: Any) -> None:
    """Found in review: questions to the inspector are asked without waiting,
    and only the blocking call had a timeout.  An inspector alive but stuck
    (stopped, starved) held them for ever: a re-check at close never came, so
    the segment of a peer that exec()ed was never revoked.  Now a question
    unanswered for REPLY_TIMEOUT fails as unverifiable: the waiting peer is
    refused, not left hanging, and the broker goes on once the inspector does."""
    import signal
    import time

    from shmbroker._broker.inspector import REPLY_TIMEOUT

    b = broker_factory("--landlock", "on")
    with open(f"/proc/{b.pid}/task/{b.pid}/children") as f:
        (inspector,) = [int(x) for x in f.read().split()]
    os.kill(inspector, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(errors.PermissionDenied, match="did not answer"):
            ShmClient.attach("p", "producer", socket_path=b.socket, size=4096, timeout=REPLY_TIMEOUT + 10)
        assert time.monotonic() - start < REPLY_TIMEOUT + 5
    finally:
        os.kill(inspector, signal.SIGCONT)
    with ShmClient.attach("p", "producer", socket_path=b.socket, size=4096) as p:
        p.buf[:2] = b"ok"
