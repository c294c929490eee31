"""Tools for the adversarial suite: a raw protocol peer that does what the
client library never would, a broker run inside a forked copy of the test
process (so test seams can be set without any switch in production code),
PID recycling, and small config writers.

Everything here drives the real kernel: real sockets, real processes."""

from __future__ import annotations

import array
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shmbroker import ShmClient
from shmbroker._sys import fdpass
from shmbroker._wire import messages as m
from shmbroker._wire.connection import Connection, Side
from shmbroker._wire.frames import FrameDecoder

PYTHON = os.path.realpath(sys.executable)
MAX_FRAME = 64 * 1024


def frames(*messages: m.Message) -> bytes:
    """The bytes a well-behaved client would send for ``messages``."""
    conn = Connection(Side.CLIENT, max_frame_size=MAX_FRAME)
    return b"".join(conn.send(msg) for msg in messages)


HELLO = frames(m.Hello())


def hello_attach(channel: str = "adv", role: str = "producer", size: int | None = 4096) -> bytes:
    return frames(m.Hello(), m.Attach(channel=channel, role=role, size=size))


def write_config(directory: Path, body: str, *, name: str = "broker.toml") -> str:
    path = directory / name
    path.write_text(body)
    return str(path)


def _toml_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"{key} = {'true' if value else 'false'}"
    return f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value!r}"


def policy_toml(
    *, uids: tuple[int, ...] = (0,), executables: tuple[str, ...] | None = (PYTHON,), limits: dict[str, Any] | None = None,
    channels: dict[str, dict[str, Any]] | None = None, socket_group: int | None = None,
) -> str:
    """A config allowing ``uids`` (running one of ``executables``) everything, with create.

    ``socket_group`` lets processes of that group reach the socket, so the
    broker itself (not the directory mode) is what refuses them."""
    lines = []
    if socket_group is not None:
        lines += ["[broker]", f"socket_group = {socket_group}"]
    if limits:
        lines.append("[limits]")
        lines += [f"{k} = {v!r}" for k, v in limits.items()]
    for name, spec in (channels or {}).items():
        lines.append(f"[channels.{name}]")
        lines += [_toml_value(k, v) for k, v in spec.items()]
    lines.append("[status]")
    lines.append("uids = [0]")
    lines.append("[[rules]]")
    lines.append(f"uids = {list(uids)!r}")
    if executables is not None:
        lines.append("executables = [" + ", ".join(f'"{e}"' for e in executables) + "]")
    lines.append("create = true")
    return "\n".join(lines) + "\n"


class RawPeer:
    """A hand-driven client socket: sends what it is told, decodes raw replies
    (no conversation checks: the point is to see exactly what the broker says)."""

    def __init__(self, path: str, *, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._init()

    def _init(self) -> None:
        self.decoder = FrameDecoder(16 * 1024 * 1024, max_buffered=64 * 1024 * 1024)
        self.fds: list[int] = []
        self.eof = False

    @classmethod
    def adopt(cls, sock: socket.socket) -> RawPeer:
        peer = cls.__new__(cls)
        peer.sock = sock
        sock.settimeout(5.0)
        peer._init()
        return peer

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        """Send; a broker that already hung up is not an error here (read
        :meth:`replies` to see why it did)."""
        try:
            if fds:
                fdpass.send_with_fds(self.sock, data, fds)
            else:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _next(self, deadline: float) -> m.Message | None:
        while True:
            body = self.decoder.next_frame()
            if body is not None:
                return m.decode(body, m.REPLIES)
            if self.eof:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data, fds, _ = fdpass.recv_with_fds(self.sock, 65536)
            except (TimeoutError, socket.timeout):
                return None
            except ConnectionResetError:
                data, fds = b"", []
            self.fds.extend(fds)
            if not data:
                self.eof = True
            else:
                self.decoder.feed(data)

    def replies(self, timeout: float = 5.0) -> list[m.Message]:
        """Every reply until the broker closes the connection (or timeout)."""
        deadline = time.monotonic() + timeout
        out = []
        while (msg := self._next(deadline)) is not None:
            out.append(msg)
        return out

    def reply(self, timeout: float = 5.0) -> m.Message:
        """The next reply (raises if none arrives)."""
        msg = self._next(time.monotonic() + timeout)
        if msg is None:
            raise ConnectionError("no reply from the broker")
        return msg

    def closed_by_broker(self, timeout: float = 5.0) -> bool:
        """True once the broker has closed its end (EOF or reset); drains replies."""
        deadline = time.monotonic() + timeout
        while self._next(deadline) is not None:
            pass
        return self.eof

    def close(self) -> None:
        fdpass.close_all(self.fds)
        self.fds = []
        self.sock.close()


def error_of(message: m.Message) -> tuple[str, str]:
    assert isinstance(message, m.Error), f"expected an error, got {message!r}"
    return message.code, message.message


def counters(socket_path: str) -> dict[str, int]:
    return dict(ShmClient.status(socket_path=socket_path)["counters"])


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- a broker inside a forked copy of this process ---------------------------
@dataclasses.dataclass
class InProcessBroker:
    pid: int
    socket: str
    log: Path

    def status(self) -> dict[str, Any]:
        return ShmClient.status(socket_path=self.socket)

    def stop(self) -> int:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"in-process broker did not stop on SIGTERM; log:\n{self.log.read_text()}")


@contextlib.contextmanager
def inprocess_broker(
    tmp: Path, config_path: str | None = None, *, hook: Callable[[int], None] | None = None, name: str = "inproc"
) -> Iterator[InProcessBroker]:
    """Run the broker code in a forked child of the test process.

    ``hook`` becomes ``shmbroker._broker.auth.after_credentials_hook`` in that
    child only.  The seam is a module attribute with no config key, option or
    environment variable behind it, so production brokers cannot turn it on.
    """
    sock = str(tmp / name / "broker.sock")
    log_path = tmp / f"{name}-broker.log"
    pid = os.fork()
    if pid == 0:  # the broker
        code = 1
        try:
            from shmbroker._broker import auth
            from shmbroker._broker.config import default_config, load_config
            from shmbroker._broker.driver import Broker
            from shmbroker._logging import TextFormatter

            handler = logging.FileHandler(log_path)
            handler.setFormatter(TextFormatter())
            root = logging.getLogger("shmbroker")
            root.handlers[:] = [handler]
            root.setLevel(logging.DEBUG)
            root.propagate = False
            auth.after_credentials_hook = hook
            config = load_config(config_path) if config_path else default_config()
            Broker(config, sock).run()
            code = 0
        except BaseException:
            with open(log_path, "a") as f:
                f.write(traceback.format_exc())
        finally:
            os._exit(code)
    broker = InProcessBroker(pid=pid, socket=sock, log=log_path)
    try:
        deadline = time.monotonic() + 15
        while True:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                raise RuntimeError(f"in-process broker died at start:\n{log_path.read_text()}")
            try:
                broker.status()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield broker
    finally:
        try:
            code = broker.stop()
        except ChildProcessError:
            code = 0
        assert code == 0, f"in-process broker exited with {code}; log:\n{log_path.read_text()}"


# -- PID recycling -------------------------------------------------------------
NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"


def can_recycle_pids() -> bool:
    return os.geteuid() == 0 and os.access(NS_LAST_PID, os.W_OK)


def recycle_pid(target: int, attempts: int = 200) -> int | None:
    """Fork a process (running this interpreter) that gets exactly ``target`` as its pid.

    Uses ns_last_pid (root only), as CRIU does.  Other processes on the
    machine may grab the pid first, so retry; None if it never worked.
    Returns the child's pid; the caller kills and reaps it.
    """
    for _ in range(attempts):
        with open(NS_LAST_PID, "w") as f:
            f.write(str(target - 1))
        pid = os.fork()
        if pid == 0:
            try:
                time.sleep(60)
            finally:
                os._exit(0)
        if pid == target:
            return pid
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return None


def reap(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def dev_null_fds(n: int) -> list[int]:
    return [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(n)]


def send_fds_raw(sock: socket.socket, data: bytes, fds: list[int]) -> int:
    """sendmsg with SCM_RIGHTS even when ``data`` is empty (fdpass refuses nothing)."""
    return sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def stable_fd_count(pid: int, settle: float = 0.3, timeout: float = 10.0) -> int:
    """The broker's fd count once it stopped changing for ``settle`` seconds
    (a status query just made leaves its session open until EOF is read)."""
    from helpers import fd_count

    deadline = time.monotonic() + timeout
    last, since = fd_count(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = fd_count(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle:
            return now
    raise AssertionError(f"fd count of pid {pid} never settled")


def wait_fd_baseline(pid: int, baseline: int, timeout: float = 10.0) -> None:
    from helpers import fd_count

    deadline = time.monotonic() + timeout
    while fd_count(pid) > baseline:
        if time.monotonic() > deadline:
            raise AssertionError(f"broker pid {pid} holds {fd_count(pid)} fds, baseline {baseline}: a leak")
        time.sleep(0.05)


def start_broker_with(tmp: Path, prefix: list[str], *args: str, name: str = "run") -> Any:
    """Like conftest.start_broker, with ``prefix`` (e.g. setpriv ...) in front."""
    import subprocess

    from helpers import BrokerProc

    sock = tmp / name / "broker.sock"
    log = tmp / f"{name}-broker.log"
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "shmbroker", "serve", "--socket", str(sock), "-v", *args],
        stdout=subprocess.DEVNULL, stderr=open(log, "w"),
    )
    broker = BrokerProc(proc=proc, socket=str(sock), log=log)
    # Not broker.wait_ready(): with fewer capabilities than this process the
    # broker cannot verify us (cap_ptrace_access_check), so watch the log.
    deadline = time.monotonic() + 15
    while "listening on" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"broker did not start:\n{log.read_text()}")
        time.sleep(0.02)
    return broker


def capabilities(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


CAP_SYS_PTRACE = 19


# -- abusive peers, for the abuse tests and benchmarks/abuse_latency.py ------------
def pipeline_refused_status(path: str, *, connections: int = 4, burst: int = 5000) -> None:
    """Forever: ``connections`` sessions, each pipelining ``burst`` status
    requests at a time (refused unless the caller may ask for status) and
    reading the refusals, so its pipeline never stalls on itself."""
    import threading

    request = frames(*([m.StatusRequest()] * burst))

    def connection() -> None:
        peer = RawPeer(path)
        peer.send(frames(m.Hello()))
        peer.reply()
        while True:
            peer.sock.sendall(request)
            got = 0
            while got < burst:
                data = peer.sock.recv(1 << 20)
                if not data:
                    return
                got += data.count(b"permission denied")

    threads = [threading.Thread(target=connection, daemon=True) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def churn_large_channels(path: str, *, size: int = 1 << 30) -> None:
    """Forever: create a channel of ``size`` bytes and drop it again (reserve, then wipe)."""
    from shmbroker import errors

    i = 0
    while True:
        i += 1
        try:
            ShmClient.attach(f"big{i % 2}", size=size, socket_path=path, timeout=30).close()
        except errors.ShmBrokerError:
            time.sleep(0.01)
