"""The client side: talk to the broker, receive and check the segment, map it."""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import time
import warnings
from types import TracebackType
from typing import cast

from . import _trust, errors
from ._types import ROLES, Role, Status
from ._layout import FLAG_RING, HEADER_SIZE, LAYOUT_VERSION, REVOKED, REVOKED_OFFSET, parse_header, segment_length
from ._paths import client_socket_path
from ._ring.client import CursorFetcher, RingPages, take_ring_fds
from ._ring.endpoint import Receiver, RingMethods, Sender
from ._ring.layout import resolve_max_message
from ._sys import fdpass, memfd, sigbus
from ._sys.mapping import Mapping
from ._sys.peercred import peer_credentials
from ._wire import messages as m
from ._wire.connection import CLOSED, NEED_DATA, Connection, Side

# Replies can be larger than requests (status lists every peer and recent
# event), but a broker that sends more than this is broken or not a broker.
MAX_REPLY_FRAME = 16 * 1024 * 1024
# How long close() waits for the broker to confirm a detach.  Detach is a
# courtesy (the broker also notices the socket closing), so keep it short.
DETACH_TIMEOUT = 1.0



def _no_broker(path: str) -> errors.BrokerUnavailable:
    return errors.BrokerUnavailable(
        f"no broker is listening on {path}; start one with `shmbroker serve` "
        "or pass the socket path of a running broker"
    )


def _not_admitted(path: str) -> errors.PermissionDenied:
    return errors.PermissionDenied(
        f"permission denied connecting to {path}: the broker's socket directory does not admit "
        "this user (ask its operator for the socket group)"
    )


def _trusted_socket_path(path: str, broker_uids: frozenset[int]) -> str:
    """Resolve ``path`` and check that nobody but root, this process's uid and
    the uids it accepts as broker could have put what listens there; return
    the resolved path, which is what we connect to (see _trust for why)."""
    # Our own uid is trusted for the path even under an explicit broker_uid:
    # a process of our uid can take this one over by ptrace anyway.
    trusted = broker_uids | {_trust.ROOT, os.geteuid()}
    if path.startswith("\0"):
        # No directory guards an abstract name: whoever binds it first owns it.
        raise errors.UntrustedBroker(
            f"refusing to connect to the abstract socket {path[1:]!r}: any process can take an abstract "
            "name first, so it cannot be trusted; pass the path of the broker's socket file"
        )
    try:
        return _trust.resolve_and_check(path, trusted)
    except (FileNotFoundError, NotADirectoryError):
        raise _no_broker(path) from None
    except PermissionError:
        raise _not_admitted(path) from None
    except OSError as exc:
        raise errors.BrokerUnavailable(
            f"cannot check the socket path {path}: {exc.filename}: {exc.strerror}; try again"
        ) from None
    except _trust.UnsafePath as exc:
        resolved = _trust.resolve(path)
        where = path if resolved == os.path.abspath(path) else f"{path} (resolved: {resolved})"
        if exc.foreign_owner:
            risk = f"so uid {exc.uid} could put its own broker at this path"
            advice = (
                "Put the socket in a directory only you or root can write (e.g. $XDG_RUNTIME_DIR/shmbroker), "
                f"or, if uid {exc.uid} runs this broker legitimately, pass broker_uid={exc.uid} or set "
                f"{_trust.BROKER_USER_ENV}={exc.uid}"
            )
        else:
            risk = "so others could put their own broker at this path"
            advice = (
                f"Have its owner run `{exc.fix}`, or put the socket in a directory only you or root can write "
                "(e.g. $XDG_RUNTIME_DIR/shmbroker)"
            )
        raise errors.UntrustedBroker(
            f"refusing to connect to {where}: {exc.message}, {risk}; nothing was sent. {advice}."
        ) from None


class _Link:
    """One connection to the broker, with a deadline on every blocking step.

    Mutual authentication: before a single byte goes out, the socket path
    and the uid of the process listening on it (SO_PEERCRED, recorded by the
    kernel when the broker called listen()) must both be trusted, so a
    broker run by someone else never sees a producer's request, and a
    consumer never maps memory an impostor prepared.
    """

    def __init__(self, path: str, timeout: float, broker_uids: frozenset[int]) -> None:
        self.path = path
        self.deadline = time.monotonic() + timeout
        self.fds: list[int] = []
        self.conn = Connection(Side.CLIENT, max_frame_size=MAX_REPLY_FRAME)
        target = _trusted_socket_path(path, broker_uids)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._connect(target)
            self._check_peer(broker_uids)
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise _no_broker(path) from None
        except PermissionError:
            self.sock.close()
            raise _not_admitted(path) from None
        except BaseException:
            self.sock.close()
            raise

    def _check_peer(self, broker_uids: frozenset[int]) -> None:
        pid, uid, _ = peer_credentials(self.sock)
        if uid in broker_uids:
            return
        env_value = _trust.user_name(uid) or str(uid)
        raise errors.UntrustedBroker(
            f"refusing to talk to the broker at {self.path}: it runs as uid {_trust.user_label(uid)} (pid {pid}), "
            f"but this client accepts only uids {_trust.uids_label(broker_uids)} as its broker, so it may be an "
            f"impostor; nothing was sent. If this broker is legitimate, pass broker_uid={uid} or set "
            f"{_trust.BROKER_USER_ENV}={env_value}."
        )

    def _connect(self, target: str) -> None:
        # A blocking connect() with SO_SNDTIMEO, not Python's timeout mode:
        # while the broker's listen backlog is full, a blocking AF_UNIX
        # connect waits in the kernel's queue of connectors and is woken, one
        # at a time in order, as the broker accepts, whereas a non-blocking
        # one fails with EAGAIN and can only poll, losing the freed slot to
        # whoever asks first (another uid flooding connects, say).
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise errors.Timeout(f"the broker at {self.path} did not answer in time")
        seconds = int(remaining)
        self.sock.settimeout(None)
        self.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, int((remaining - seconds) * 1e6))
        )
        try:
            self.sock.connect(target)
        except (BlockingIOError, InterruptedError):
            raise errors.Timeout(
                f"the broker at {self.path} is not accepting connections (its listen backlog is "
                "full: it is overloaded or stopped); try again later"
            ) from None
        finally:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))

    def _arm(self) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise errors.Timeout(f"the broker at {self.path} did not answer in time")
        self.sock.settimeout(remaining)

    def send(self, *messages: m.Message) -> None:
        data = b"".join(self.conn.send(msg) for msg in messages)
        try:
            self._arm()
            self.sock.sendall(data)
        except TimeoutError:
            raise errors.Timeout(f"the broker at {self.path} did not accept our request in time") from None
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                self._raise_pending_error()
            raise errors.BrokerUnavailable(f"lost the connection to the broker at {self.path}: {exc.strerror}") from None

    def _raise_pending_error(self) -> None:
        """The broker hung up on us; it may have said why before it did."""
        try:
            self.sock.settimeout(0.2)
            reply = self.receive()
        except errors.ShmBrokerError as exc:
            if isinstance(exc, (errors.BrokerUnavailable, errors.Timeout)):
                return
            raise
        raise errors.ProtocolError(f"unexpected {reply.TYPE} from the broker")

    def receive(self) -> m.Message:
        """The next message; an Error reply is raised as the matching exception."""
        while True:
            try:
                event = self.conn.next_event()
            except errors.ProtocolError as exc:
                raise errors.ProtocolError(f"the broker at {self.path} sent a malformed reply: {exc}") from None
            if event is CLOSED:
                raise errors.BrokerUnavailable(f"the broker at {self.path} closed the connection")
            if event is not NEED_DATA:
                assert isinstance(event, m.Message)
                if isinstance(event, m.Error):
                    raise errors.for_code(event.code)(event.message)
                return event
            self._fill()

    def _fill(self) -> None:
        try:
            self._arm()
            data, fds, flags = fdpass.recv_with_fds(self.sock, 65536)
        except TimeoutError:
            raise errors.Timeout(f"the broker at {self.path} did not answer in time") from None
        except ConnectionResetError:
            data, fds, flags = b"", [], 0
        except OSError as exc:
            raise errors.BrokerUnavailable(f"lost the connection to the broker at {self.path}: {exc.strerror}") from None
        self.fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            # The kernel dropped fds it could not install (our RLIMIT_NOFILE,
            # or a hostile sender); we cannot know what was meant for us.
            raise errors.ProtocolError(
                "file descriptors from the broker were truncated (MSG_CTRUNC): this process is probably "
                "at its open-file limit (ulimit -n)"
            )
        self.conn.receive_data(data)

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def close(self) -> None:
        fdpass.close_all(self.take_fds())
        self.sock.close()


def _resolve_path(socket_path: str | os.PathLike[str] | None) -> str:
    if socket_path is not None:
        return os.fspath(socket_path)
    try:
        return client_socket_path()
    except FileNotFoundError as exc:
        raise errors.BrokerUnavailable(str(exc)) from None


def _broker_uids(broker_uid: int | str | None) -> frozenset[int]:
    try:
        return _trust.broker_uids(broker_uid)
    except ValueError as exc:
        raise ValueError(f"broker_uid={broker_uid!r}: {exc}; pass the broker's uid or user name") from None


class Attachment(RingMethods):
    """One process's attachment to a channel: the channel's segment, mapped
    here, valid until :meth:`close`.  :meth:`ShmClient.attach` returns it.

    On a raw channel, read and write the payload through :attr:`buf`
    (writable for producers only).  On a ring channel, producers call
    :meth:`send`, :meth:`send_many`, :meth:`reserve` or :meth:`send_async`,
    consumers :meth:`recv`, :meth:`recv_into`, :meth:`recv_many`,
    :meth:`receive_view` or :meth:`recv_async`.  Calling a method of the
    other role, or a message method on a raw channel, raises
    :class:`shmbroker.errors.UnsupportedOperation`.

    Use it in a ``with`` block or call :meth:`close`.  After close the
    segment is unmapped for this process; a view obtained from ``buf`` that
    is still alive then reads zeros and its writes go nowhere: it never
    crashes the process, and never reaches the segment.  An attachment
    dropped without close is closed when it is garbage-collected, with a
    ResourceWarning naming its channel, as an unclosed file warns.
    """

    # Documented slots, not properties: help() lists each with its
    # docstring, and reading one costs what reading a plain attribute does
    # (a property made each read of att.buf three times as slow).  The
    # instance keeps a __dict__ (from RingMethods) for the ring fast paths.
    __slots__ = {
        "channel": "The channel's name.",
        "role": '``"producer"`` or ``"consumer"``, as attached.',
        "size": "Payload bytes of the segment (the length of ``buf``).",
        "generation": (
            "Which segment of the channel this is: it goes up each time the broker gives the channel a new "
            "one (after a wipe, or once every peer left), so attachments of one generation share memory."
        ),
        "buf": (
            "The payload as a memoryview of ``size`` bytes: writable for a producer, read-only for a "
            "consumer.  On a ring channel it holds the ring's records; use the message methods there."
        ),
    }
    channel: str
    role: Role
    size: int
    generation: int
    buf: memoryview

    def __init__(
        self, link: _Link, mapping: Mapping, reply: m.Attached, ring_fds: list[int] | None = None,
        pages: RingPages | None = None,
    ) -> None:
        """Built by :meth:`ShmClient.attach` from the broker's reply; not for applications to call."""
        # Set last (below): until then there is nothing for close() or the
        # finalizer to do, since attach() cleans up after a failed __init__.
        self._link: _Link | None = None
        self._mapping = mapping
        self.channel = reply.channel
        self.role = reply.role
        self.size = reply.size
        self.generation = reply.generation
        self._header = mapping.view[:HEADER_SIZE]
        self.buf = mapping.view[HEADER_SIZE : HEADER_SIZE + reply.size]
        self._ring: Sender | Receiver | None = None
        self._ring_fds = ring_fds or []
        # A ring's pages (memfds of their own): the control page (sleeping
        # flags, writable by every peer), the index page (read-only for
        # consumers) and a consumer's own cursor page; consumers map the
        # segment itself read-only.  The producer fetches the consumers'
        # cursor pages from the broker on this connection when it needs them.
        self._pages = pages
        if reply.ring:
            assert pages is not None
            payload = mapping.view[HEADER_SIZE : HEADER_SIZE + reply.size]
            ctrl, index = pages.control.view, pages.index.view
            if reply.role == "producer":
                self._ring = Sender(
                    ctrl, index, payload, self._header, self.channel, self._ring_fds[0], self._ring_fds[1:],
                    fetch_cursors=CursorFetcher(link),
                )
            else:
                assert reply.slot is not None and pages.cursor is not None
                self._ring = Receiver(
                    ctrl, index, payload, self._header, self.channel, reply.slot, pages.cursor.view,
                    self._ring_fds[0], self._ring_fds[1], start=reply.start,
                )
            self._bind_ring_fast_paths()
        self._link = link

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (or the finalizer closed it)."""
        return self._link is None

    @property
    def revoked(self) -> bool:
        """True once the broker wiped this segment (lease break, identity change,
        panic), or a peer truncated it under this process (the SIGBUS guard
        then replaced this mapping with zero pages)."""
        if self._link is None:
            return True
        flag: int = REVOKED.unpack_from(self._header, REVOKED_OFFSET)[0]
        return flag != 0

    def check(self) -> None:
        """Raise ChannelRevoked if the segment was revoked."""
        if self.revoked:
            if self._mapping.faulted:
                raise errors.ChannelRevoked(
                    f"channel {self.channel!r} (generation {self.generation}) was truncated by a peer; this "
                    "process now maps zeros in its place (the broker revokes it too); attach again for a fresh segment"
                )
            raise errors.ChannelRevoked(
                f"channel {self.channel!r} (generation {self.generation}) was revoked by the broker; "
                "attach again for a fresh segment"
            )

    def close(self) -> None:
        """Detach: tell the broker, unmap the segment.  Safe to call twice."""
        self._close(detach=True)

    def __del__(self) -> None:
        """Close an attachment dropped without :meth:`close`, with a ResourceWarning."""
        if getattr(self, "_link", None) is None:
            return
        # Like an unclosed file: say which channel was left open, then close
        # it, since a mapping nobody can reach is only a leak.
        warnings.warn(
            f"unclosed attachment to channel {self.channel!r} ({self.role}, generation {self.generation}); "
            "call close() or attach in a `with` block",
            ResourceWarning, source=self,
        )
        try:
            self._close(detach=False)
        except Exception:
            pass  # at interpreter exit, modules this needs may be gone already

    def _close(self, *, detach: bool) -> None:
        link, self._link = self._link, None
        if link is None:
            return
        try:
            # The finalizer skips the courtesy Detach (up to DETACH_TIMEOUT of
            # waiting inside the garbage collector): closing the socket
            # detaches just the same.
            if detach:
                link.deadline = time.monotonic() + DETACH_TIMEOUT
                link.send(m.Detach())
                link.receive()
        except errors.ShmBrokerError:
            pass  # the broker is gone or refused; closing the socket detaches anyway
        finally:
            link.close()
            if self._ring is not None:
                self._unbind_ring_fast_paths()
                self._ring.close()
                self._ring = None  # later calls say "closed", not "released memoryview"
            fdpass.close_all(self._ring_fds)
            self._ring_fds = []
            for view in (self.buf, self._header):
                try:
                    view.release()
                except BufferError:
                    pass
            self._mapping.close()
            if self._pages is not None:
                self._pages.close()

    @property
    def _control(self) -> Mapping | None:
        """The ring's shared control page (tests write it as a hostile peer would)."""
        return None if self._pages is None else self._pages.control

    @property
    def _cursor(self) -> Mapping | None:
        """A ring consumer's own cursor page (tests write it as a compromised process would)."""
        return None if self._pages is None else self._pages.cursor

    def __enter__(self) -> Attachment:
        """``with ShmClient.attach(...) as att:`` closes the attachment on exit."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """Close the attachment (see :meth:`close`)."""
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"generation {self.generation}"
        return f"<Attachment channel={self.channel!r} role={self.role} size={self.size} {state}>"


class ShmClient:
    """Entry point for applications: :meth:`attach` to a channel, or ask a
    broker for its :meth:`status`.  Both are class methods; there is nothing
    to instantiate."""

    @classmethod
    def attach(
        cls,
        channel: str,
        role: Role = "producer",
        *,
        socket_path: str | os.PathLike[str] | None = None,
        size: int | None = None,
        ring: bool = False,
        max_message: int | None = None,
        timeout: float = 5.0,
        harden: bool = False,
        broker_uid: int | str | None = None,
        wait: float | None = None,
    ) -> Attachment:
        """Attach to ``channel`` as ``"producer"`` or ``"consumer"``.

        ``wait=SECONDS`` (consumers): if the channel does not exist yet, or is
        a ring without a producer, the broker holds the request until it does
        (a producer attaches) and answers then; after ``wait`` seconds it
        raises :class:`~shmbroker.errors.Timeout`.  No polling: start the
        consumer first.  ``timeout`` then covers only the rest of the attach.

        A producer passing ``size=`` creates the channel if it does not exist
        and the broker's policy allows it; with ``ring=True`` the new channel
        carries messages of up to ``max_message`` bytes (default: 64 KiB or
        a quarter of the ring).  Consumers attach to a ring channel without
        these arguments.  Raises a subclass of
        :class:`shmbroker.errors.ShmBrokerError` on refusal.

        ``harden=True`` first makes this process non-dumpable with no core
        dumps (see :mod:`shmbroker.hardening`; capabilities are left alone).
        A non-dumpable process hides its /proc/PID/exe, so only a broker
        holding CAP_SYS_PTRACE can verify it; any other broker rejects it.

        Before sending anything, the client checks who the broker is: the
        process listening on the socket must run as a trusted uid, and every
        directory on the socket path must be owned by root or a trusted uid
        and not writable by others (else :class:`~shmbroker.errors.UntrustedBroker`).
        Trusted by default: this process's euid, root, and the ``shmbroker``
        system user if it exists.  ``broker_uid=`` (a uid or user name), or
        else the ``SHMBROKER_BROKER_USER`` environment variable, replaces
        that with exactly that uid and root.
        """
        if role not in ROLES:
            raise ValueError(f"role must be 'producer' or 'consumer', not {role!r}")
        if not isinstance(channel, str) or not m.valid_channel_name(channel):
            raise ValueError(
                f"invalid channel name {channel!r}: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise ValueError(f"size must be a positive number of bytes, not {size!r}")
        if max_message is not None and (not ring or size is None):
            raise ValueError("max_message= only applies when creating a ring channel (size=..., ring=True)")
        if ring and size is not None:
            try:
                resolve_max_message(size, max_message)
            except ValueError as exc:
                raise ValueError(f"cannot create ring channel {channel!r}: {exc}") from None
        if wait is not None:
            if role != "consumer":
                raise ValueError("wait= is for consumers: a producer creates the channel (size=...) or attaches to it")
            if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= m.MAX_WAIT:
                raise ValueError(f"wait must be a number of seconds from 0 to {m.MAX_WAIT:g}, not {wait!r}")
        uids = _broker_uids(broker_uid)
        if harden:
            from .hardening import harden_process

            harden_process(drop_capabilities=False)
        link = _Link(_resolve_path(socket_path), timeout + (wait or 0.0), uids)
        ring_fds: list[int] = []
        pages: RingPages | None = None
        try:
            link.send(m.Hello(), m.Attach(
                channel=channel, role=role, size=size, ring=bool(ring), max_message=max_message,
                wait=None if wait is None else float(wait),
            ))
            link.receive()  # welcome
            reply = link.receive()
            if not isinstance(reply, m.Attached):
                raise errors.ProtocolError(f"the broker answered attach with {reply.TYPE}")
            if ring and not reply.ring:
                raise errors.ChannelBusy(f"channel {channel!r} is a raw channel, not a ring")
            fds = link.take_fds()
            pages, ring_fds = take_ring_fds(reply, fds)
            mapping = _map_segment(reply, fds)
            try:
                return Attachment(link, mapping, reply, ring_fds, pages)
            except BaseException:
                mapping.close()
                raise
        except BaseException:
            fdpass.close_all(ring_fds)
            if pages is not None:
                pages.close()
            link.close()
            raise

    @classmethod
    def status(
        cls, *, socket_path: str | os.PathLike[str] | None = None, timeout: float = 5.0,
        broker_uid: int | str | None = None,
    ) -> Status:
        """The broker's status: channels, attached peers, counters, security events.

        Returns a :class:`shmbroker.Status` (a dict; its keys are documented
        there).  ``socket_path``, ``timeout`` and ``broker_uid`` as for
        :meth:`attach`.  Only uids the broker's ``[status]`` config names (by
        default its own) may ask; others get PermissionDenied.
        """
        link = _Link(_resolve_path(socket_path), timeout, _broker_uids(broker_uid))
        try:
            link.send(m.Hello(), m.StatusRequest())
            link.receive()
            reply = link.receive()
            if not isinstance(reply, m.StatusReply):
                raise errors.ProtocolError(f"the broker answered status with {reply.TYPE}")
            missing = sorted(set(Status.__required_keys__) - set(reply.status))
            if missing:
                raise errors.ProtocolError(
                    f"the broker's status reply lacks {', '.join(missing)}; is the broker a different version of shmbroker?"
                )
            return cast(Status, dict(reply.status))
        finally:
            link.close()


def _check_seals(fd: int) -> None:
    """A memfd must be sealed against resizing before we map it: otherwise
    any peer holding it could truncate it and kill us with SIGBUS."""
    if not memfd.is_memfd(fd):
        return
    if not memfd.has_size_seals(fd):
        raise errors.SegmentError(
            "the broker sent a memfd segment that is not sealed against resizing "
            "(F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL); a peer could truncate it and crash this "
            "process with SIGBUS, so it was refused"
        )


def _map_segment(reply: m.Attached, fds: list[int]) -> Mapping:
    """Check the fds the broker sent, map the segment, close every fd."""
    try:
        if reply.fds[:1] != ("segment",) or len(fds) != 1:
            raise errors.ProtocolError(
                f"the broker sent {len(fds)} file descriptor(s) for {list(reply.fds)}; expected one segment"
            )
        if reply.layout != LAYOUT_VERSION:
            raise errors.SegmentError(
                f"segment layout {reply.layout} is not the {LAYOUT_VERSION} this client understands; "
                "upgrade shmbroker on one side"
            )
        fd = fds[0]
        st = os.fstat(fd)
        length = segment_length(reply.size)
        if not stat.S_ISREG(st.st_mode):
            raise errors.SegmentError("the broker sent something that is not a shared-memory object")
        if st.st_nlink != 0 or stat.S_IMODE(st.st_mode) != 0:
            raise errors.SegmentError(
                "the segment is still linked or has a non-zero mode, so others could open it; refusing to use it"
            )
        if st.st_size != length:
            raise errors.SegmentError(f"the segment is {st.st_size} bytes, expected {length}; refusing to map it")
        _check_seals(fd)
        # Consumers never write to the segment (a ring's cursors and flags
        # live in pages of their own): map it read-only even where the fd
        # would allow more.  Guarded, because any peer of a posix channel
        # can truncate the object under us (memfd segments are sealed, but
        # one code path for both costs nothing).
        try:
            mapping = Mapping(fd, length, writable=reply.role == "producer", revoked_offset=REVOKED_OFFSET)
        except sigbus.TableFull as exc:
            raise errors.LimitExceeded(f"{exc}; close attachments this process no longer uses") from None
    finally:
        fdpass.close_all(fds)
    header = parse_header(mapping.view)
    if (
        header is None or header.revoked or header.size != reply.size or header.generation != reply.generation
        or bool(header.flags & FLAG_RING) != reply.ring
    ):
        mapping.close()
        raise errors.SegmentError("the segment header does not match what the broker announced; refusing it")
    return mapping
