"""shmbroker: a secure shared-memory IPC broker for Linux.

The public API is what this module exports plus :mod:`shmbroker.errors`;
every other module is private and may change without notice.
"""

from __future__ import annotations

from . import errors

__all__ = ["errors"]
__version__ = "0.1.0"
