"""The listening socket: a private directory under trusted ones, one broker
per path, no stale files."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat

from .. import _trust
from ..errors import BrokerAlreadyRunning, ConfigError
from .._sys import fdpass
from .._sys.peercred import peer_credentials

log = logging.getLogger(__name__)

# Connections the kernel queues before accept().  Short on purpose: the
# broker learns a connector's uid only by accepting it, so a newcomer waits
# behind every connection queued before it, each of which may be another
# uid's flood.  Connectors beyond the backlog are not refused: a blocking
# connect() (the client's) waits in the kernel's queue and is let in, in
# order, as the loop accepts (docs/attacks.md, A8).
LISTEN_BACKLOG = 16


class Listener:
    """Owns the socket directory lock, the socket file and the listening socket."""

    def __init__(self, path: str, group: int | None = None) -> None:
        given = os.path.abspath(path)
        # Resolve the symlinks above the socket directory once and use the
        # result for every later step, so the chain checked at open() is the
        # chain we bind, lock and unlink in (a link retargeted after the check
        # cannot move us).  The socket directory itself is not resolved: a
        # symlink there is refused below, as before.
        directory = os.path.dirname(given)
        self.directory = os.path.join(_trust.resolve(os.path.dirname(directory)), os.path.basename(directory))
        self.path = os.path.join(self.directory, os.path.basename(given))
        self.group = group
        self.sock: socket.socket | None = None
        self._dir_fd = -1
        self._created_dir = False
        self._owns_path = False

    @property
    def created_directory(self) -> bool:
        """True when this listener created the socket directory (and so removes it at close)."""
        return self._created_dir

    def open(self) -> socket.socket:
        self._prepare_directory()
        self._lock_directory()
        self._clear_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.bind(self.path)
            self._owns_path = True
            # The directory already keeps others out; the socket's own mode is
            # the second fence should someone loosen the directory later.
            os.chmod(self.path, 0o660 if self.group is not None else 0o600)
            if self.group is not None:
                os.chown(self.path, -1, self.group)
            # Accepted sockets inherit it: each request says which process
            # sent it, so a connection handed to another one is caught.
            fdpass.pass_credentials(sock)
            sock.listen(LISTEN_BACKLOG)
        except BaseException:
            sock.close()
            self.close()
            raise
        self.sock = sock
        return sock

    def check_free(self) -> None:
        """Raise now what :meth:`open` would raise for a path another broker
        serves, or one under directories others could write; create and
        change nothing.  `serve` calls this before it hardens itself and
        logs anything, so a refused start prints the reason and no more.

        open() checks again, under the directory lock: a broker that starts
        between the two is still refused there."""
        self._check_ancestors()
        try:
            self._check_directory(os.lstat(self.directory), 0o750 if self.group is not None else 0o700)
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return  # no directory yet, so no broker; anything else, open() explains
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BrokerAlreadyRunning(self._running_message()) from None
        finally:
            os.close(dir_fd)  # and with it the lock, if we took it

    def adopt(self, sock: socket.socket) -> socket.socket:
        """Use a socket handed over by systemd; it owns the path, we do not unlink it."""
        sock.setblocking(False)
        fdpass.pass_credentials(sock)
        self.sock = sock
        return sock

    def _check_ancestors(self) -> None:
        """Whoever can write a directory above ours can rename ours away and
        put their own broker at our path while we run; refuse to start under
        any directory not owned by root or us, or writable by others (a
        sticky one like /tmp is fine: our directory in it is checked to be
        ours in _prepare_directory)."""
        parent = os.path.dirname(self.directory)
        euid = os.geteuid()
        try:
            _trust.check_directories(parent, {_trust.ROOT, euid})
        except FileNotFoundError:
            raise ConfigError(
                f"cannot create socket directory {self.directory}: its parent does not exist"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"cannot check the directories above {self.directory}: {exc.filename}: {exc.strerror}"
            ) from None
        except _trust.UnsafePath as exc:
            who = f"uid {exc.uid}" if exc.foreign_owner else "others"
            writers = "root" if euid == _trust.ROOT else f"root or uid {euid}"
            raise ConfigError(
                f"refusing to serve on {self.path}: {exc.message}, so {who} could rename the socket directory "
                f"away and put another broker at this path. Pick a --socket under directories only {writers} "
                "can write (e.g. $XDG_RUNTIME_DIR/shmbroker/broker.sock, or /run/shmbroker/broker.sock for root), "
                f"or run `{exc.fix}`"
            ) from None

    def _prepare_directory(self) -> None:
        mode = 0o750 if self.group is not None else 0o700
        self._check_ancestors()
        try:
            os.mkdir(self.directory, mode)
            self._created_dir = True
        except FileExistsError:
            pass
        except FileNotFoundError:
            raise ConfigError(
                f"cannot create socket directory {self.directory}: its parent does not exist"
            ) from None
        except PermissionError:
            raise ConfigError(f"cannot create socket directory {self.directory}: permission denied") from None
        self._check_directory(os.lstat(self.directory), mode)
        # Ours, or no more open than ours should be: set exactly our mode
        # (mkdir's went through the umask; a configured group needs g+rx).
        os.chmod(self.directory, mode)
        if self.group is not None:
            os.chown(self.directory, -1, self.group)

    def _check_directory(self, st: os.stat_result, mode: int) -> None:
        """Refuse a socket directory that is not ours to use (see _prepare_directory)."""
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{self.directory} is not a directory; pick another --socket path")
        if st.st_uid != os.geteuid():
            raise ConfigError(
                f"socket directory {self.directory} belongs to uid {st.st_uid}, not the broker's "
                f"uid {os.geteuid()}; put the socket in a directory of its own, e.g. "
                f"{os.path.join(self.directory, 'shmbroker', os.path.basename(self.path))}"
            )
        if not self._created_dir and stat.S_IMODE(st.st_mode) & ~mode & 0o7777:
            # Never tighten a directory we did not make that others may use:
            # it may be shared (/tmp) or someone's home, and chmod 0700 on it
            # would lock everyone else out.  A leftover of ours has our mode.
            raise ConfigError(
                f"socket directory {self.directory} already exists with mode {stat.S_IMODE(st.st_mode):04o}, "
                f"more open than the {mode:04o} the broker needs; give the broker a directory of its own, "
                f"e.g. --socket {os.path.join(self.directory, 'shmbroker', os.path.basename(self.path))}, "
                f"or run `chmod {mode:o} {self.directory}` if it is meant for the broker alone"
            )

    def _lock_directory(self) -> None:
        # flock on the directory itself: no lock file to leave behind, and the
        # kernel drops it if the broker is killed.
        self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._dir_fd)
            self._dir_fd = -1
            raise BrokerAlreadyRunning(self._running_message()) from None

    def _running_message(self) -> str:
        pid = "?"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
                probe.settimeout(1.0)
                probe.connect(self.path)
                pid = str(peer_credentials(probe)[0])
        except OSError:
            pass
        return (
            f"a broker is already running on {self.path} (pid {pid}); stop it first, "
            "or pass --socket to run another one elsewhere"
        )

    def _clear_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{self.path} exists and is not a socket; remove it or pick another --socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(self.path)
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                    raise
            else:
                raise BrokerAlreadyRunning(self._running_message())
        log.info("removing stale socket %s left by a broker that is gone", self.path)
        os.unlink(self.path)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self._owns_path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._owns_path = False
        if self._created_dir:
            try:
                os.rmdir(self.directory)
            except OSError:
                pass  # someone put something there; leave it
            self._created_dir = False
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1
