"""A10: telling apart peers that share a uid and an interpreter, by cgroup
(and the systemd unit it names) and by LSM label.

For Python peers /proc/PID/exe is the interpreter, so a camera producer and
an untrusted plugin host of the same uid look alike.  These tests run two
clients with the *same* interpreter in two real cgroup v2 cgroups (no
systemd: the directories are named as systemd names them) and check what
the `units` and `cgroups` rule keys achieve, and where they stop:

* the broker reads /proc/PID/cgroup under the pidfd that pins the peer and,
  on kernels with PIDFD_GET_INFO, checks the path against the cgroup id;
* a peer moved to another cgroup while connected is reported at close
  (``identity_changed``), as a peer that exec()s is;
* a peer cannot move itself into a cgroup whose cgroup.procs it may not
  write; but wherever it may (root, or a user's own delegated subtree), a
  cgroup is only as strong as the uid;
* a peer in a cgroup namespace of its own sees "/" in /proc/self/cgroup; the
  broker reads /proc/PID/cgroup in *its* namespace and is not fooled.

Nothing here mocks the kernel; without a writable cgroup2 (or root) the
tests skip and say why.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adversary import (
    PYTHON,
    RawPeer,
    can_recycle_pids,
    error_of,
    hello_attach,
    inprocess_broker,
    reap,
    recycle_pid,
    start_broker_with,
    wait_until,
    write_config,
)
from helpers import NOBODY
from shmbroker._broker import config as broker_config
from shmbroker._sys import cgroup as syscgroup
from shmbroker._sys import pidfd as syspidfd
from shmbroker.errors import ConfigError

# Attaches once told to, reports one line, then holds the attachment until
# told to close (so the broker re-checks it at close).
PEER = r"""
import ctypes, json, sys
from shmbroker import ShmClient, errors
socket_path, channel, unshare = sys.argv[1], sys.argv[2], sys.argv[3] == "yes"
if unshare:
    assert ctypes.CDLL(None, use_errno=True).unshare(0x02000000) == 0, "unshare(CLONE_NEWCGROUP)"
own_view = open("/proc/self/cgroup").read().strip().splitlines()[-1]
sys.stdin.readline()
try:
    att = ShmClient.attach(channel, size=4096, socket_path=socket_path)
except errors.ShmBrokerError as exc:
    print(json.dumps({"ok": False, "error": type(exc).__name__ + ": " + str(exc), "own_view": own_view}), flush=True)
    sys.exit(0)
print(json.dumps({"ok": True, "own_view": own_view}), flush=True)
sys.stdin.readline()
att.close()
print(json.dumps({"ok": True, "closed": True}), flush=True)
"""


class CgroupTree:
    """``<own cgroup>/shmbtest-XXXX.slice/{camera,plugin}.service``, removed afterwards."""

    def __init__(self, mount: Path, root: Path, slice_path: str) -> None:
        self.mount = mount
        self.root = root  # the slice's directory
        self.slice = slice_path  # as /proc/PID/cgroup shows it

    def path(self, unit: str) -> str:
        return f"{self.slice}/{unit}"

    def procs(self, unit: str) -> Path:
        return self.root / unit / "cgroup.procs"

    def move(self, pid: int, unit: str) -> None:
        self.procs(unit).write_text(f"{pid}\n")


def _cgroup_tree() -> Iterator[CgroupTree]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create cgroups")
    mount = syscgroup.cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 mount on this machine (mount | grep cgroup2)")
    own = syscgroup.process_cgroup(os.getpid())
    base = syscgroup.cgroup_directory(mount, own) if own is not None else None
    if base is None:
        pytest.skip(f"this process's cgroup ({own}) is not visible under the cgroup2 mount {mount[0]}")
    name = f"shmbtest-{uuid.uuid4().hex[:8]}.slice"
    root = Path(base) / name
    try:
        root.mkdir()
        for unit in ("camera.service", "plugin.service"):
            (root / unit).mkdir()
    except OSError as exc:
        shutil.rmtree(root, ignore_errors=True)  # cgroupfs: rmdir of the empty ones
        pytest.skip(f"cgroup2 at {mount[0]} is not writable here ({exc.strerror})")
    tree = CgroupTree(Path(mount[0]), root, f"{own.rstrip('/')}/{name}" if own else f"/{name}")
    try:
        yield tree
    finally:
        for unit in ("camera.service", "plugin.service"):
            _empty_and_remove(root / unit, root.parent)
        _empty_and_remove(root, root.parent)


def _empty_and_remove(directory: Path, parent: Path) -> None:
    try:
        for pid in (directory / "cgroup.procs").read_text().split():
            try:
                (parent / "cgroup.procs").write_text(pid)
            except OSError:
                pass
        directory.rmdir()
    except OSError:
        pass


@pytest.fixture
def cgroups() -> Iterator[CgroupTree]:
    yield from _cgroup_tree()


def _config(tmp: Path, rule_extra: str) -> str:
    """uid 0 running this interpreter, plus ``rule_extra``; status for root."""
    return write_config(tmp, (
        "[status]\nuids = [0]\n"
        f'[[rules]]\nuids = [0]\nexecutables = ["{PYTHON}"]\n{rule_extra}\ncreate = true\n'
    ))


class Peer:
    """A client of this very interpreter, started inside ``unit``'s cgroup."""

    def __init__(self, tree: CgroupTree, unit: str, socket_path: str, channel: str, *, unshare: bool = False) -> None:
        procs = str(tree.procs(unit))

        def enter() -> None:  # in the child, before exec: the peer never runs outside its cgroup
            with open(procs, "w") as f:
                f.write("0")

        self.proc = subprocess.Popen(
            [sys.executable, "-c", PEER, socket_path, channel, "yes" if unshare else "no"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=enter,
        )
        self.pid = self.proc.pid

    def say(self) -> dict[str, Any]:
        import json

        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline() if ready else ""
        assert line, f"peer {self.pid} said nothing (exit {self.proc.poll()})"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.mark.parametrize("landlock", ["on", "off"])
@pytest.mark.parametrize("key", ["units", "cgroups"])
def test_same_interpreter_same_uid_told_apart_by_cgroup(
    cgroups: CgroupTree, broker_factory: Any, short_tmp: Path, key: str, landlock: str
) -> None:
    """Two peers of one uid running one interpreter: the rule admits the one in
    camera.service and refuses the one in plugin.service, and the refusal is
    a security event naming where the peer is."""
    allowed = '"camera.service"' if key == "units" else f'"{cgroups.path("camera.service")}"'
    b = broker_factory("--config", _config(short_tmp, f"{key} = [{allowed}]"), "--landlock", landlock)
    camera = Peer(cgroups, "camera.service", b.socket, "frames")
    plugin = Peer(cgroups, "plugin.service", b.socket, "frames")
    try:
        assert os.path.realpath(f"/proc/{camera.pid}/exe") == os.path.realpath(f"/proc/{plugin.pid}/exe")
        assert camera.say()["ok"]
        refused = plugin.say()
        assert not refused["ok"] and refused["error"].startswith("PermissionDenied"), refused
        assert "plugin.service" in refused["error"]
        # Root may always ask for status, so it is admitted and its attach is
        # what is refused; another uid would be refused at once (peer_rejected).
        events = [e for e in b.status()["security_events"] if e["pid"] == plugin.pid]
        assert [e["kind"] for e in events] == ["request_refused"], events
        assert "unit plugin.service" in events[0]["detail"] or cgroups.path("plugin.service") in events[0]["detail"]
        # status shows the verified peer's unit and cgroup
        (peer,) = [p for c in b.status()["channels"] if c["name"] == "frames" for p in c["peers"]]
        assert peer["pid"] == camera.pid and peer["unit"] == "camera.service", peer
        assert peer["cgroup"] == cgroups.path("camera.service") and peer["label"] is None, peer
    finally:
        camera.close()
        plugin.close()


def test_a_peer_moved_to_another_cgroup_while_connected_is_reported_at_close(
    cgroups: CgroupTree, broker_factory: Any, short_tmp: Path
) -> None:
    b = broker_factory("--config", _config(short_tmp, 'units = ["camera.service"]'))
    camera = Peer(cgroups, "camera.service", b.socket, "moved")
    try:
        assert camera.say()["ok"]
        assert not b.events("identity_changed")
        cgroups.move(camera.pid, "plugin.service")
        assert camera.say()["closed"]
        events = wait_until(lambda: b.events("identity_changed"), what="identity_changed")
        assert events[0]["pid"] == camera.pid and events[0]["channel"] == "moved", events
        assert cgroups.path("plugin.service") in events[0]["detail"], events
    finally:
        camera.close()


def test_a_peer_in_its_own_cgroup_namespace_is_judged_by_where_it_really_is(
    cgroups: CgroupTree, broker_factory: Any, short_tmp: Path
) -> None:
    """unshare(CLONE_NEWCGROUP) makes a peer's own /proc/self/cgroup say "/":
    /proc/PID/cgroup is rendered for the namespace of its reader, the broker."""
    b = broker_factory("--config", _config(short_tmp, 'units = ["camera.service"]'))
    camera = Peer(cgroups, "camera.service", b.socket, "ns", unshare=True)
    plugin = Peer(cgroups, "plugin.service", b.socket, "ns", unshare=True)
    try:
        admitted, refused = camera.say(), plugin.say()
        assert admitted["ok"] and admitted["own_view"] == "0::/", admitted
        assert not refused["ok"] and refused["own_view"] == "0::/", refused
        assert "plugin.service" in refused["error"], refused
    finally:
        camera.close()
        plugin.close()


def _try_to_move_self(tree: CgroupTree, start: str, target: str, uid: int) -> int:
    """As ``uid``, from ``start``'s cgroup, write our own pid into ``target``'s
    cgroup.procs; 0 on success, else the errno."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            tree.move(os.getpid(), start)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with open(tree.procs(target), "w") as f:
                f.write("0")
        except OSError as exc:
            code = exc.errno or 1
        os.write(w, code.to_bytes(2, "little"))
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return int.from_bytes(data, "little")


def test_a_process_cannot_move_itself_into_a_cgroup_whose_procs_it_may_not_write(cgroups: CgroupTree) -> None:
    """A system service's cgroups belong to root: its (non-root) process cannot leave its unit."""
    assert _try_to_move_self(cgroups, "plugin.service", "camera.service", NOBODY) in (errno.EACCES, errno.EPERM)


def test_a_unit_is_only_as_strong_as_the_uid_where_the_uid_owns_the_cgroups(cgroups: CgroupTree) -> None:
    """What systemd does for a user session (user@UID.service is delegated to
    the user): with the subtree the uid's own, its process moves itself from
    one of the user's units into another.  There `units` and `cgroups` add
    nothing to `uids`; docs/security.md says so."""
    for path in (cgroups.root, cgroups.root / "camera.service", cgroups.root / "plugin.service"):
        for name in ("", "cgroup.procs"):
            os.chown(path / name if name else path, NOBODY, NOBODY)
    assert _try_to_move_self(cgroups, "plugin.service", "camera.service", NOBODY) == 0


def test_root_moves_any_process_anywhere(cgroups: CgroupTree, broker_factory: Any, short_tmp: Path) -> None:
    """Root may write every cgroup.procs: a root peer refused by `units` moves
    itself into the admitted unit and is admitted.  Against root the keys
    are no boundary (nothing is: root can ptrace the broker)."""
    b = broker_factory("--config", _config(short_tmp, 'units = ["camera.service"]'))
    plugin = Peer(cgroups, "plugin.service", b.socket, "root")
    try:
        cgroups.move(plugin.pid, "camera.service")
        assert plugin.say()["ok"]
    finally:
        plugin.close()


def test_a_broker_that_cannot_see_cgroup2_still_judges_by_the_path(cgroups: CgroupTree, short_tmp: Path) -> None:
    """A broker in a mount namespace without the cgroup2 mount cannot stat the
    peer's cgroup directory to compare with the pidfd's cgroup id; it warns
    once and judges by the path read under the pidfd, as on kernels without
    PIDFD_GET_INFO, rather than locking out every `units` rule."""
    import signal

    if not shutil.which("unshare"):
        pytest.skip("needs unshare (util-linux)")
    mount = syscgroup.cgroup2_mount()
    assert mount is not None
    hide = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'umount -l "{mount[0]}" && exec "$@"', "sh"]
    b = start_broker_with(short_tmp, hide, "--config", _config(short_tmp, 'units = ["camera.service"]'), name="nocg2")
    camera = Peer(cgroups, "camera.service", b.socket, "nocg2")
    plugin = Peer(cgroups, "plugin.service", b.socket, "nocg2")
    try:
        assert camera.say()["ok"]
        refused = plugin.say()
        assert not refused["ok"] and "unit plugin.service" in refused["error"], refused
        assert "cgroup2 is not mounted here" in b.log.read_text()
    finally:
        camera.close()
        plugin.close()
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(10) == 0


def test_the_pidfd_cgroup_id_is_the_cgroup_directory_inode(cgroups: CgroupTree) -> None:
    """PIDFD_GET_INFO (6.13+) names the pinned process's cgroup by id, which on
    cgroup2 is the inode of the cgroup's directory: what the broker checks
    the /proc/PID/cgroup path against."""
    child = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: cgroups.procs("camera.service").write_text("0"))
    fd = os.pidfd_open(child.pid)
    try:
        cgroup_id = syspidfd.cgroup_id(fd)
        if cgroup_id is None:
            pytest.skip("the kernel has no PIDFD_GET_INFO (Linux 6.13+)")
        assert cgroup_id == os.stat(cgroups.root / "camera.service").st_ino
        cgroups.move(child.pid, "plugin.service")
        assert syspidfd.cgroup_id(fd) == os.stat(cgroups.root / "plugin.service").st_ino
        child.kill()
        child.wait()
        with pytest.raises(OSError) as exc:
            syspidfd.cgroup_id(fd)
        assert exc.value.errno == errno.ESRCH  # a reaped peer: no answer, never someone else's
    finally:
        os.close(fd)
        if child.poll() is None:
            child.kill()
            child.wait()


def test_a_peer_moved_while_being_verified_is_refused_not_judged_by_the_cgroup_it_left(
    cgroups: CgroupTree, short_tmp: Path
) -> None:
    """The broker takes the cgroup id from the pidfd first, then reads
    /proc/PID/cgroup; a move in between (here: by the broker's test seam,
    right after the pidfd is pinned) shows as a path whose directory is not
    that cgroup, and the peer is refused rather than admitted by either."""
    probe = os.pidfd_open(os.getpid())
    try:
        if syspidfd.cgroup_id(probe) is None:
            pytest.skip("the kernel has no PIDFD_GET_INFO (Linux 6.13+): the path alone is read")
    finally:
        os.close(probe)

    me = os.getpid()  # asks for status: left where it is

    def hook(pid: int) -> None:  # in the broker, between the pidfd's answer and the /proc read
        if pid != me:
            cgroups.move(pid, "plugin.service")

    config = _config(short_tmp, f'cgroups = ["{cgroups.path("camera.service")}", "{cgroups.path("plugin.service")}"]')
    with inprocess_broker(short_tmp, config, hook=hook) as broker:
        camera = Peer(cgroups, "camera.service", broker.socket, "racy")
        try:
            refused = camera.say()
        finally:
            camera.close()
        assert not refused["ok"] and "moved to another cgroup while it was being verified" in refused["error"], refused
        events = [e for e in broker.status()["security_events"] if e["pid"] == camera.pid]
        assert [e["kind"] for e in events] == ["peer_rejected"], events


def test_a_pid_recycled_into_the_admitted_unit_does_not_admit_the_peer_that_left(
    cgroups: CgroupTree, broker_factory: Any, short_tmp: Path
) -> None:
    """The peer (same interpreter, plugin.service) connects while the broker
    is stopped, passes its socket on and exits; its pid goes to a process
    put in camera.service before the broker looks.  /proc/PID/cgroup then
    names camera.service: only the pidfd, asked for the cgroup id and
    checked after the read, shows that the peer is gone."""
    import signal

    from test_attack_pid_reuse import ATTACKER

    if not can_recycle_pids():
        pytest.skip("recycling a pid needs root and a writable /proc/sys/kernel/ns_last_pid")
    b = broker_factory("--config", _config(short_tmp, 'units = ["camera.service"]'))
    procs = str(cgroups.procs("plugin.service"))

    def enter() -> None:
        with open(procs, "w") as f:
            f.write("0")

    os.kill(b.pid, signal.SIGSTOP)
    recycled = None
    try:
        ours, theirs = socket.socketpair()
        with ours:
            subprocess.run(
                [sys.executable, "-c", ATTACKER, b.socket, str(theirs.fileno()), hello_attach("reuse").hex(), "no"],
                pass_fds=[theirs.fileno()], preexec_fn=enter, check=True, timeout=30,
            )
            theirs.close()
            data, anc, _, _ = ours.recvmsg(32, socket.CMSG_SPACE(4))
        dead_pid, sock = int(data), socket.socket(fileno=int.from_bytes(anc[0][2][:4], "little"))
        recycled = recycle_pid(dead_pid)
        assert recycled == dead_pid, "could not recycle the peer's pid (machine too busy?)"
        cgroups.move(recycled, "camera.service")
        assert syscgroup.process_cgroup(dead_pid) == cgroups.path("camera.service")
    finally:
        os.kill(b.pid, signal.SIGCONT)
    try:
        peer = RawPeer.adopt(sock)
        code, message = error_of(peer.reply())
        assert code == "permission_denied" and "stale pid" in message, message
        assert not peer.fds, "the broker handed a segment to a recycled pid"
        peer.close()
    finally:
        if recycled:
            reap(recycled)
    assert [e["pid"] for e in b.events("peer_rejected")] == [dead_pid]


@pytest.mark.parametrize("dumpable", [True, False])
def test_a_same_uid_process_reads_an_admitted_peers_memory_unless_it_is_non_dumpable(dumpable: bool) -> None:
    """`units` decides who the broker hands a segment to; it does not stop a
    process of the same uid from reading the admitted process's memory,
    mapping included, through /proc/PID/mem (ptrace access), as long as
    that process is dumpable.  A client that makes itself non-dumpable
    (``harden=True``) closes that door; Yama's ptrace_scope may too."""
    import ctypes

    secret = b"camera-frame-secret"
    ready_r, ready_w = os.pipe()
    camera = os.fork()
    if camera == 0:
        try:
            os.close(ready_r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            # setuid() left us non-dumpable, as exec() would not: a service
            # started by systemd is dumpable unless it says otherwise.
            assert ctypes.CDLL(None).prctl(4, int(dumpable), 0, 0, 0) == 0  # PR_SET_DUMPABLE
            buf = ctypes.create_string_buffer(secret)
            os.write(ready_w, ctypes.addressof(buf).to_bytes(8, "little"))
            import time

            time.sleep(30)
        finally:
            os._exit(0)
    os.close(ready_w)
    address = int.from_bytes(os.read(ready_r, 8), "little")
    os.close(ready_r)
    out_r, out_w = os.pipe()
    plugin = os.fork()
    if plugin == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                fd = os.open(f"/proc/{camera}/mem", os.O_RDONLY)
                os.write(out_w, os.pread(fd, len(secret), address))
            except OSError as exc:
                os.write(out_w, f"errno {exc.errno}".encode())
        finally:
            os._exit(0)
    os.close(out_w)
    with os.fdopen(out_r, "rb") as f:
        got = f.read()
    os.waitpid(plugin, 0)
    os.kill(camera, 9)
    os.waitpid(camera, 0)
    if dumpable:
        try:
            with open("/proc/sys/kernel/yama/ptrace_scope") as f:
                if f.read().strip() != "0":
                    pytest.skip("Yama's ptrace_scope keeps same-uid processes from reading each other here")
        except OSError:
            pass  # no Yama: same uid may
        assert got == secret
    else:
        assert got == f"errno {errno.EACCES}".encode(), got


# -- labels (SO_PEERSEC) ----------------------------------------------------------
def _peersec_answers() -> bool:
    a, b = socket.socketpair()
    try:
        a.getsockopt(socket.SOL_SOCKET, socket.SO_PEERSEC, 256)
        return True
    except OSError:
        return False
    finally:
        a.close()
        b.close()


def test_labels_refuse_to_load_where_no_lsm_labels_sockets(tmp_path: Path) -> None:
    """Without SELinux, AppArmor or Smack every peer is unlabelled: a `labels`
    key would lock everyone out of its rule, so the config is refused."""
    if _peersec_answers():
        pytest.skip("an LSM labels sockets here; see test_so_peersec_label_admits_by_label")
    path = tmp_path / "broker.toml"
    path.write_text('[[rules]]\nuids = [0]\nlabels = ["camera_t"]\n')
    with pytest.raises(ConfigError) as exc:
        broker_config.load_config(str(path))
    message = str(exc.value)
    assert "rules[0].labels: no LSM labels sockets on this system" in message, message
    assert "Protocol not available" in message, message


def test_so_peersec_label_admits_by_label(broker_factory: Any, short_tmp: Path) -> None:
    """Where an LSM labels sockets, the peer's label as SO_PEERSEC reports it
    is what `labels` matches, and status shows it."""
    if not _peersec_answers():
        pytest.skip("no LSM labels sockets here (SO_PEERSEC: ENOPROTOOPT); the labels key refuses to load instead")
    a, c = socket.socketpair()
    own = a.getsockopt(socket.SOL_SOCKET, socket.SO_PEERSEC, 4096).rstrip(b"\0").decode()
    a.close()
    c.close()
    from shmbroker import ShmClient, errors

    b = broker_factory("--config", _config(short_tmp, f'labels = ["{own}"]'))
    with ShmClient.attach("labelled", size=4096, socket_path=b.socket):
        (peer,) = [p for ch in b.status()["channels"] if ch["name"] == "labelled" for p in ch["peers"]]
        assert peer["label"] == own
    other = _config(short_tmp, 'labels = ["no-such-label-*"]')
    b2 = broker_factory("--config", other, name="other")
    with pytest.raises(errors.PermissionDenied, match="label"):
        ShmClient.attach("labelled", size=4096, socket_path=b2.socket)


def test_the_unit_is_read_from_the_cgroup_path_as_systemd_does() -> None:
    from shmbroker._broker.policy import unit_of

    assert unit_of("/system.slice/camera.service") == "camera.service"
    assert unit_of("/system.slice/camera.service/worker") == "camera.service"
    assert unit_of("/system.slice/system-ml.slice/ml@3.service") == "ml@3.service"
    assert unit_of("/user.slice/user-1000.slice/user@1000.service/app.slice/x.service") == "user@1000.service"
    assert unit_of("/user.slice/user-1000.slice/session-2.scope") == "session-2.scope"
    assert unit_of("/") is None and unit_of("/system.slice") is None and unit_of("/payload/x.service") is None
    assert unit_of(None) is None


def test_unit_and_cgroup_keys_report_every_bad_entry(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        "[[rules]]\nuids = [0]\n"
        'units = ["camera.service", "system.slice", "/system.slice/x.service", "camera"]\n'
        'cgroups = ["system.slice/x", "/a/../b", "/ok/*"]\n'
        "[[rules]]\nuids = [0]\nunits = []\n"
    )
    with pytest.raises(ConfigError) as exc:
        broker_config.load_config(str(path))
    lines = str(exc.value).splitlines()
    expected = [
        "rules[0].units: 'system.slice' is a slice",
        "rules[0].units: '/system.slice/x.service' is a cgroup path",
        "rules[0].units: 'camera' is not a systemd unit name",
        "rules[0].cgroups: 'system.slice/x' must be an absolute cgroup path",
        "rules[0].cgroups: '/a/../b' must not contain",
        "rules[1].units: must not be empty",
    ]
    for part in expected:
        assert any(part in line for line in lines), (part, lines)
    assert len(lines) == len(expected), lines


def test_units_and_cgroups_refuse_to_load_without_a_cgroup_v2_hierarchy(tmp_path: Path) -> None:
    """On a cgroup v1-only system no process has a cgroup v2 path: the keys
    could match nobody, and say so (the check reads our own /proc/self/cgroup;
    here given a v1-only copy, since this machine has cgroup2)."""
    v1_only = tmp_path / "cgroup"
    v1_only.write_text("12:pids:/system.slice/x.service\n1:name=systemd:/system.slice/x.service\n")
    reason = broker_config.cgroups_unavailable(str(v1_only))
    assert reason is not None and "no cgroup v2 hierarchy" in reason
    hybrid = tmp_path / "hybrid"
    hybrid.write_text("1:name=systemd:/system.slice/x.service\n0::/system.slice/x.service\n")
    assert broker_config.cgroups_unavailable(str(hybrid)) is None
    assert broker_config.cgroups_unavailable() is None  # this machine


def test_a_peer_outside_the_broker_cgroup_namespace_has_no_cgroup() -> None:
    """A path beginning with "/.." (the peer is above our cgroup namespace's
    root) names no directory we can check, and matches no pattern."""
    assert syscgroup.cgroup_directory(("/sys/fs/cgroup", "/"), "/../../x.service") is None
    assert syscgroup.cgroup_directory(("/sys/fs/cgroup", "/sub"), "/other/x") is None
    assert syscgroup.cgroup_directory(("/sys/fs/cgroup", "/sub"), "/sub/x") == "/sys/fs/cgroup/x"



def _named_v1_hierarchy() -> Path | None:
    """A mounted cgroup v1 hierarchy with no controllers (name=systemd on a
    hybrid system): where systemd delegates a subtree to each user."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup" and any(o.startswith("name=") for o in fields[sep + 3].split(",")):
                return Path(fields[4])
    return None


def test_a_v1_cgroup_named_like_a_cgroup2_line_cannot_forge_the_peers_cgroup() -> None:
    """Found by the red team: the kernel refuses a newline in a cgroup name
    but not a carriage return, and hybrid systems hand each user a v1 subtree
    of their own.  A cgroup named ``x\\r0::/system.slice/camera.service``
    there put a second ``0::`` "line" in the peer's /proc/PID/cgroup, ahead
    of the real one, and a parser splitting at every line break took it:
    judged by path, the peer was admitted by ``units = ["camera.service"]``."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create cgroups")
    v1 = _named_v1_hierarchy()
    if v1 is None:
        pytest.skip("no named cgroup v1 hierarchy here (a pure cgroup2 system has no such lines at all)")
    top = v1 / f"shmbtest-{uuid.uuid4().hex[:8]}"
    forged = top / "x\r0::" / "system.slice" / "camera.service"
    try:
        forged.mkdir(parents=True)
    except OSError as exc:
        pytest.skip(f"{v1} is not writable here ({exc.strerror})")
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        (forged / "cgroup.procs").write_text(str(child.pid))
        raw = Path(f"/proc/{child.pid}/cgroup").read_bytes()
        assert b"\r0::/system.slice/camera.service" in raw, raw  # what the kernel shows
        assert syscgroup.process_cgroup(child.pid) == syscgroup.process_cgroup(os.getpid())  # the real one, inherited
    finally:
        child.kill()
        child.wait()
        for directory in (forged, forged.parent, forged.parent.parent, top):
            try:
                directory.rmdir()
            except OSError:
                pass


def test_a_cgroup_file_without_one_whole_cgroup2_line_is_unknown() -> None:
    """Two ``0::`` lines cannot both be true, and the kernel cuts a path of
    PATH_MAX without saying so (a prefix a pattern might match): unknown."""
    parse = syscgroup.parse_cgroup_file
    assert parse(b"1:name=systemd:/user.slice\n0::/system.slice/camera.service\n") == "/system.slice/camera.service"
    assert parse(b"0::/a.service\n0::/b.service\n") is None
    assert parse(b"0::/" + b"a" * (syscgroup.MAX_PATH - 1) + b"\n") is None
    assert parse(b"0::/" + b"a" * (syscgroup.MAX_PATH - 2) + b"\n") is not None
    assert parse(b"1:name=systemd:/u/x\r0::/system.slice/camera.service\n0::/user.slice/s.scope\n") == "/user.slice/s.scope"
