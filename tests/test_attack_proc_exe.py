"""A3: /proc/PID/exe pitfalls.  Reading it needs PTRACE_MODE_READ; a
non-dumpable peer makes it unreadable (rustdesk PR #16088 treated that
error as success).  Identity is (st_dev, st_ino), never the path string:
"(deleted)" suffixes and replaced files must neither grant nor deny by name."""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adversary import CAP_SYS_PTRACE, capabilities, policy_toml, start_broker_with, write_config
from conftest import env_for_copy
from helpers import run_in_child
from shmbroker import ShmClient, errors

PR_SET_DUMPABLE = 4

ATTACH = r"""
import sys
from shmbroker import ShmClient, errors
sys.stdin.readline()  # wait until the test has prepared the binary
try:
    ShmClient.attach(sys.argv[2], size=4096, socket_path=sys.argv[1]).close()
    print("granted")
except errors.ShmBrokerError as exc:
    print(type(exc).__name__ + ": " + str(exc))
"""


def _attach_non_dumpable(socket_path: str) -> str:
    def child() -> str:
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
        try:
            ShmClient.attach("nd", size=4096, socket_path=socket_path).close()
            return "granted"
        except errors.ShmBrokerError as exc:
            return f"{type(exc).__name__}: {exc}"

    return run_in_child(child)


NO_PTRACE = ["setpriv", "--bounding-set", "-sys_ptrace", "--"]
# Peers without any capability: a hardened broker keeps none but CAP_SYS_PTRACE,
# and without it the kernel lets it inspect only processes whose capabilities
# are a subset of its own, so a capable root peer would be refused for that
# reason instead of the one under test.
NO_CAPS = ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all", "--"]

PEER = r"""
import ctypes, sys
from shmbroker import ShmClient, errors
if sys.argv[2] == "non-dumpable":
    assert ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) == 0  # PR_SET_DUMPABLE
try:
    ShmClient.attach(sys.argv[2], size=4096, socket_path=sys.argv[1]).close()
    print("granted")
except errors.ShmBrokerError as exc:
    print(type(exc).__name__ + ": " + str(exc))
"""


@pytest.fixture
def broker_without_ptrace(short_tmp: Path) -> Iterator[Any]:
    if not shutil.which("setpriv") or os.geteuid() != 0:
        pytest.skip("needs root and setpriv (util-linux) to drop CAP_SYS_PTRACE")
    b = start_broker_with(short_tmp, NO_PTRACE, name="noptrace")
    yield b
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(10) == 0


def test_non_dumpable_peer_is_verified_by_a_broker_with_cap_sys_ptrace(broker: Any) -> None:
    if not capabilities(broker.pid) & (1 << CAP_SYS_PTRACE):
        pytest.skip("the broker does not hold CAP_SYS_PTRACE here")
    assert _attach_non_dumpable(broker.socket) == "granted"


def test_non_dumpable_peer_is_rejected_by_a_broker_without_cap_sys_ptrace(broker_without_ptrace: Any) -> None:
    """The broker runs as root without CAP_SYS_PTRACE, its peers as root without capabilities."""
    b = broker_without_ptrace
    assert not capabilities(b.pid) & (1 << CAP_SYS_PTRACE)

    def peer(kind: str) -> str:
        result = subprocess.run(
            [*NO_CAPS, sys.executable, "-c", PEER, b.socket, kind], capture_output=True, text=True, timeout=30
        )
        assert result.stdout, result.stderr
        return result.stdout.strip()

    outcome = peer("non-dumpable")
    assert outcome.startswith("PermissionDenied") and "non-dumpable" in outcome and "CAP_SYS_PTRACE" in outcome
    assert "security event peer_rejected" in b.log.read_text()
    # A dumpable peer of the same uid still gets in: the refusal is precise.
    assert peer("dumpable") == "granted"


def _run_copy(binary: Path, socket_path: str, channel: str, before_go: Any = None) -> str:
    proc = subprocess.Popen(
        [str(binary), "-c", ATTACH, socket_path, channel],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_for_copy(),
    )
    try:
        if before_go is not None:
            before_go(proc)
        out, err = proc.communicate("go\n", timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert out, err
    return out.strip()


def test_peer_whose_binary_was_deleted_is_still_recognised_by_inode(
    broker_factory: Any, short_tmp: Path
) -> None:
    binary = short_tmp / "allowed-python"
    shutil.copy2(os.path.realpath(sys.executable), binary)
    b = broker_factory("--config", write_config(short_tmp, policy_toml(executables=(str(binary),))))

    def delete(proc: subprocess.Popen[str]) -> None:
        binary.unlink()
        assert os.readlink(f"/proc/{proc.pid}/exe").endswith(" (deleted)")

    assert _run_copy(binary, b.socket, "deleted", delete) == "granted"


def test_same_path_different_inode_is_refused(broker_factory: Any, short_tmp: Path) -> None:
    """The policy names a path; the file there is replaced after the policy
    loaded.  A path-string comparison would admit the impostor."""
    binary = short_tmp / "allowed-python"
    shutil.copy2(os.path.realpath(sys.executable), binary)
    b = broker_factory("--config", write_config(short_tmp, policy_toml(executables=(str(binary),))))
    binary.unlink()
    shutil.copy2(os.path.realpath(sys.executable), binary)  # same path, new inode
    outcome = _run_copy(binary, b.socket, "impostor")
    assert outcome.startswith("PermissionDenied: permission denied: executable"), outcome
    assert b.status()["counters"].get("attaches", 0) == 0


MAIN_THREAD_EXITS = r"""
import ctypes, sys, threading, time
from shmbroker import ShmClient, errors
def worker():
    time.sleep(0.5)  # the main thread is gone by now
    try:
        ShmClient.attach("mt", size=4096, socket_path=sys.argv[1]).close()
        print("granted", flush=True)
    except errors.ShmBrokerError as exc:
        print(type(exc).__name__ + ": " + str(exc), flush=True)
threading.Thread(target=worker).start()
ctypes.CDLL(None).pthread_exit(None)
"""


def test_peer_whose_main_thread_exited_is_refused_with_a_clear_reason(broker: Any) -> None:
    result = subprocess.run(
        [sys.executable, "-c", MAIN_THREAD_EXITS, broker.socket], capture_output=True, text=True, timeout=30
    )
    out = result.stdout.strip()
    assert out.startswith("PermissionDenied"), (out, result.stderr)
    assert "main thread" in out and "keep the main thread alive" in out
    rejected = broker.events("peer_rejected")
    assert rejected and "main thread" in rejected[-1]["detail"]


FUSE_SERVER = Path(__file__).with_name("fuse_exe.py")


def _fuse_usable() -> str | None:
    if os.geteuid() != 0:
        return "mounting a FUSE file system needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    with open("/proc/filesystems") as f:
        if not any(line.split()[-1] == "fuse" for line in f if line.strip()):
            return "the kernel has no fuse file system"
    return None


def _detach(mountpoint: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2(str(mountpoint).encode(), 2)  # MNT_DETACH; fails harmlessly once the server is gone


@pytest.mark.parametrize("landlock", ["on", "off"])
def test_a_peer_whose_exe_hangs_its_fuse_server_cannot_stall_the_broker(
    broker_factory: Any, short_tmp: Path, landlock: str
) -> None:
    """A peer serves its own executable from a FUSE mount and stops answering
    GETATTR.  A plain stat of /proc/PID/exe would wait for that answer in
    uninterruptible sleep (observed: not even SIGTERM ends it), stalling the
    event loop, or with Landlock the exe inspector and then every later peer.
    The broker asks with statx(AT_STATX_DONT_SYNC): the server never sees a
    request, the peer is judged (and refused: another inode), and a
    legitimate client attaches meanwhile."""
    reason = _fuse_usable()
    if reason:
        pytest.skip(reason)
    mnt, hang = short_tmp / "mnt", short_tmp / "hang"
    mnt.mkdir()
    server = subprocess.Popen(
        [sys.executable, str(FUSE_SERVER), str(mnt), os.path.realpath(sys.executable), "python3", str(hang)],
        stdout=subprocess.PIPE, text=True,
    )
    peer = None
    try:
        assert server.stdout is not None
        started = server.stdout.readline().strip()
        if started != "ready":
            pytest.skip(started or "the FUSE test server did not start")
        b = broker_factory("--landlock", landlock)
        peer = subprocess.Popen(
            [str(mnt / "python3"), "-c", ATTACH, b.socket, "fuse"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env_for_copy(),
        )
        assert peer.stdin is not None and peer.stdout is not None
        hang.touch()  # from now on the server leaves every GETATTR of the file unanswered
        peer.stdin.write("go\n")
        peer.stdin.flush()
        # Judged at once: well inside the inspector's 5 s reply timeout.
        ready, _, _ = select.select([peer.stdout], [], [], 3)
        assert ready, "the broker did not judge the peer within 3 s"
        verdict = peer.stdout.readline().strip()
        assert verdict.startswith("PermissionDenied"), verdict
        assert not (short_tmp / "hang.count").exists(), "the broker sent the FUSE server a GETATTR"
        with ShmClient.attach("legit", size=4096, socket_path=b.socket, timeout=3) as att:
            assert att.size == 4096
    finally:
        # Killing the server aborts the connection: any request still waiting fails.
        server.kill()
        server.wait()
        _detach(mnt)
        if peer is not None:
            peer.kill()
            peer.wait()
