"""Brokers run by someone else: what an outsider with another uid can do.

Both run in forked children of the test process that drop to the attacker's
uid first (the interpreter under /root is out of reach after that, so they
must not exec anything):

* :func:`recording_fake` listens on a path and counts every byte any client
  sends it; it never answers.  A client that trusts it leaks its request
  (``hello`` + ``attach``: channel, role, size) before it notices anything.
* :func:`broker_as` runs the real broker code as another uid: either a
  legitimate broker of that uid (keeping CAP_SYS_PTRACE, like the shipped
  systemd unit, so it can verify clients of other uids), or an impostor that
  skips peer verification because it does not care who connects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from shmbroker._sys import prctl as sysprctl

PR_SET_KEEPCAPS = 8  # include/uapi/linux/prctl.h


def drop_to(uid: int, gid: int, *, keep: frozenset[int] = frozenset()) -> None:
    """setuid in this (forked) process, keeping the capabilities in ``keep``."""
    if keep:
        sysprctl.prctl(PR_SET_KEEPCAPS, 1)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if keep:
        mask = sum(1 << cap for cap in keep)
        sysprctl.set_caps(mask, mask, 0)


def attacker_dir(uid: int, gid: int) -> Path:
    """A directory the attacker creates in /tmp (mode 0755, its own): where
    it would put a fake broker for a path such as /tmp/shm-demo."""
    path = Path("/tmp") / f"shmb-evil-{secrets.token_hex(4)}"

    def make() -> None:
        drop_to(uid, gid)
        os.mkdir(path, 0o755)

    _in_child(make)
    assert path.stat().st_uid == uid
    return path


def _in_child(fn: Callable[[], None]) -> None:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "child failed"


@dataclasses.dataclass
class Received:
    connections: int
    bytes: int


@dataclasses.dataclass
class RecordingFake:
    pid: int
    path: str
    _stop_w: int
    _result_r: int
    received: Received | None = None

    def stop(self) -> Received:
        if self.received is None:
            os.write(self._stop_w, b"x")
            with os.fdopen(self._result_r, "rb") as f:
                data = f.read()
            os.close(self._stop_w)
            os.waitpid(self.pid, 0)
            self.received = Received(**json.loads(data)) if data else Received(-1, -1)
        return self.received


@contextlib.contextmanager
def recording_fake(
    path: str, *, uid: int, gid: int, make_dir: bool = False, bound: socket.socket | None = None,
) -> Iterator[RecordingFake]:
    """A fake broker of ``uid`` on ``path`` that records what clients send.

    ``make_dir``: the attacker creates the socket's directory first (0755).
    ``bound``: a socket someone else already bound; the attacker only calls
    listen() on it, which is what SO_PEERCRED then reports.
    """
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        counts = {"connections": 0, "bytes": 0}
        try:
            for fd in (ready_r, stop_w, result_r):
                os.close(fd)
            drop_to(uid, gid)
            if make_dir:
                os.mkdir(os.path.dirname(path), 0o755)
            if bound is None:
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(path)
                os.chmod(path, 0o777)  # every uid may connect: the attacker wants them all
            else:
                listener = bound
            listener.listen(16)
            listener.setblocking(False)
            os.write(ready_w, b"x")
            sel = selectors.DefaultSelector()
            sel.register(listener, selectors.EVENT_READ, "accept")
            sel.register(stop_r, selectors.EVENT_READ, "stop")
            running = True
            while running:
                for key, _ in sel.select():
                    if key.data == "stop":
                        running = False
                    elif key.data == "accept":
                        conn, _ = listener.accept()
                        counts["connections"] += 1
                        sel.register(conn, selectors.EVENT_READ, "conn")
                    else:
                        conn = key.fileobj  # type: ignore[assignment]
                        try:
                            data = conn.recv(65536)
                        except ConnectionResetError:
                            data = b""
                        counts["bytes"] += len(data)
                        if not data:
                            sel.unregister(conn)
                            conn.close()
            # A last look: bytes a client sent just before we were stopped.
            for key in list(sel.get_map().values()):
                if key.data == "conn":
                    key.fileobj.setblocking(False)  # type: ignore[union-attr]
                    with contextlib.suppress(OSError):
                        counts["bytes"] += len(key.fileobj.recv(65536))  # type: ignore[union-attr]
            os.write(result_w, json.dumps(counts).encode())
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(0)
    for fd in (ready_w, stop_r, result_w):
        os.close(fd)
    fake = RecordingFake(pid=pid, path=path, _stop_w=stop_w, _result_r=result_r)
    try:
        with os.fdopen(ready_r, "rb") as f:
            if f.read(1) != b"x":
                raise RuntimeError("the fake broker did not start")
        yield fake
    finally:
        fake.stop()


@dataclasses.dataclass
class ForeignBroker:
    pid: int
    socket: str
    log: Path

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
            if done:
                return
            time.sleep(0.02)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


@contextlib.contextmanager
def broker_as(
    socket_path: str, config_path: str, log_path: Path, *, uid: int, gid: int, verify_peers: bool = True,
) -> Iterator[ForeignBroker]:
    """The real broker code, run as ``uid`` on ``socket_path``.

    ``verify_peers=True``: a legitimate broker of that uid, holding
    CAP_SYS_PTRACE as the shipped systemd unit grants it.  False: an impostor
    (no capabilities) that admits whoever connects without reading
    /proc/PID/exe, as an attacker's own copy of the broker would.
    The config is loaded here, as root, before the fork.
    """
    from shmbroker._broker.config import load_config

    config = load_config(config_path)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            from shmbroker._broker import auth
            from shmbroker._broker.driver import Broker
            from shmbroker._logging import TextFormatter

            handler = logging.FileHandler(log_path)
            handler.setFormatter(TextFormatter())
            root = logging.getLogger("shmbroker")
            root.handlers[:] = [handler]
            root.setLevel(logging.DEBUG)
            root.propagate = False
            if verify_peers:
                drop_to(uid, gid, keep=frozenset({sysprctl.CAP_SYS_PTRACE}))
            else:
                drop_to(uid, gid)
                auth._exe_identity = lambda pid, *_: ((0, 0), "(not checked by the impostor)")
            Broker(config, socket_path).run()
            code = 0
        except BaseException:
            with open(log_path, "a") as f:
                f.write(traceback.format_exc())
        finally:
            os._exit(code)
    broker = ForeignBroker(pid=pid, socket=socket_path, log=log_path)
    try:
        # Not a status query: clients (rightly) refuse this broker by default.
        deadline = time.monotonic() + 15
        while "listening on" not in (log_path.read_text() if log_path.exists() else ""):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done or time.monotonic() > deadline:
                raise RuntimeError(f"broker as uid {uid} did not start:\n{log_path.read_text()}")
            time.sleep(0.02)
        yield broker
    finally:
        broker.stop()


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
