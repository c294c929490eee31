"""The errors shmbroker raises: one hierarchy under :class:`ShmBrokerError`.

Every message says what happened and what to do about it, because these
errors reach end users through applications that just print them.
"""

from __future__ import annotations

from typing import ClassVar

from ._wire.vocabulary import ErrorCode

__all__ = [
    "ShmBrokerError",
    "BrokerUnavailable",
    "UntrustedBroker",
    "BrokerAlreadyRunning",
    "ConfigError",
    "ProtocolError",
    "PermissionDenied",
    "ChannelNotFound",
    "ChannelBusy",
    "LimitExceeded",
    "Timeout",
    "SegmentError",
    "ChannelRevoked",
    "MessageTooLarge",
    "Full",
    "Empty",
    "UnsupportedOperation",
    "UnsupportedPlatform",
]


class ShmBrokerError(Exception):
    """Base class of every error shmbroker raises on purpose.

    ``code`` is the wire error code the broker sends for it (docs/protocol.md);
    errors that only ever arise in the client keep the base class's."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL


class BrokerUnavailable(ShmBrokerError, ConnectionError):
    """The broker could not be reached, or went away mid-conversation."""


class UntrustedBroker(ShmBrokerError):
    """The process listening on the socket path, or a directory on that path,
    belongs to a uid this client does not trust to be its broker.

    Raised before the client sends a single byte.  The message names the path
    and the uid found; if that broker is legitimate, pass ``broker_uid=`` or set
    ``SHMBROKER_BROKER_USER``.
    """


class BrokerAlreadyRunning(ShmBrokerError):
    """`shmbroker serve` found a live broker on its socket path."""


class ConfigError(ShmBrokerError):
    """The configuration file or a command-line option is invalid."""


class ProtocolError(ShmBrokerError):
    """A peer sent something the wire protocol does not allow."""

    code = ErrorCode.PROTOCOL


class PermissionDenied(ShmBrokerError, PermissionError):
    """The broker's policy refused this peer or this request."""

    code = ErrorCode.PERMISSION_DENIED


class ChannelNotFound(ShmBrokerError, LookupError):
    """The channel does not exist and this request may not create it."""

    code = ErrorCode.NOT_FOUND


class ChannelBusy(ShmBrokerError):
    """The channel exists with other parameters, or cannot take another peer in this role."""

    code = ErrorCode.CONFLICT


class LimitExceeded(ShmBrokerError):
    """A configured limit (connections, segments, bytes, frame size) was hit."""

    code = ErrorCode.LIMIT


class Timeout(ShmBrokerError, TimeoutError):
    """An operation did not finish within its timeout."""

    code = ErrorCode.TIMEOUT


class SegmentError(ShmBrokerError):
    """A segment handed over by the broker failed the client's checks."""


class ChannelRevoked(ShmBrokerError):
    """The broker wiped and revoked this channel's segment.

    Raised on the next operation after a lease break, an identity change of
    a peer, a panic wipe, or a broker shutdown.  Attach again to get a fresh
    segment (a new generation) if the policy still allows it.
    """

    code = ErrorCode.REVOKED


class MessageTooLarge(ShmBrokerError, ValueError):
    """A message is larger than the channel's maximum message size."""


class Full(ShmBrokerError):
    """The channel's ring is full and the send did not wait (or timed out)."""


class Empty(ShmBrokerError):
    """No message arrived within the receive timeout."""


class UnsupportedOperation(ShmBrokerError, ValueError):
    """This attachment cannot do that: ``recv()`` on a producer, ``send()`` on
    a consumer, a message method on a raw channel.

    A mistake in the calling code, not a refusal by the broker; nothing was
    sent or received.  Named after :class:`io.UnsupportedOperation`, which
    reading a file opened for writing raises, and a ValueError like it.
    """


class UnsupportedPlatform(ShmBrokerError):
    """This machine cannot run a ring channel safely with what is installed.

    The pure-Python ring relies on x86-64's memory ordering; on any other CPU
    a ring needs shmbroker's C extension (built by ``pip install`` with a C
    compiler and the Python headers).  Raw channels are not affected.
    """


def for_code(code: str) -> type[ShmBrokerError]:
    """The exception class for a wire error code (ShmBrokerError for one it does not know)."""
    return _BY_CODE.get(code, ShmBrokerError)


# The classes the broker sends as error replies: one per code.
_BY_CODE: dict[str, type[ShmBrokerError]] = {
    cls.code.value: cls
    for cls in (ProtocolError, PermissionDenied, ChannelNotFound, ChannelBusy, LimitExceeded, Timeout, ChannelRevoked)
}
