"""Shared mappings that hold no file descriptor and survive close() with views alive.

Python's :class:`mmap.mmap` keeps a dup() of the fd for its whole life, which
would leave every client holding the segment open, and its close() refuses to
run while buffers are exported.  We map with mmap(2) through ctypes instead:

* the caller may close the fd right after mapping;
* :meth:`Mapping.close` replaces the shared pages with private anonymous
  memory at the same address (MAP_FIXED), so the segment is released at once,
  while a memoryview that is still alive keeps pointing at valid memory: it
  reads zeros and its writes go nowhere, instead of crashing the process;
* the address range itself is unmapped when the last exported view dies;
* every mapping is locked in RAM and excluded from core dumps (memlock.py):
  segments carry secrets, and this is the only place the library maps them;
* a mapping made with ``revoked_offset`` is guarded against truncation
  (sigbus.py): if the object shrinks under it, the next access past the end
  finds private zero pages with the revoked word set instead of killing the
  process with SIGBUS.
"""

from __future__ import annotations

import ctypes
import mmap
import weakref

from . import memlock, sigbus
from .libc import libc, raise_errno

_mmap = libc.mmap
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_mmap.restype = ctypes.c_void_p
_munmap = libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_munmap.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value
MAP_FIXED = 0x10


_RELEASED = memoryview(b"")
_RELEASED.release()


def _unmap(address: int, length: int, guard: int | None) -> None:
    # Unguard first: once unmapped, the address may be handed to an unrelated
    # mapping that the guard must never replace.
    if guard is not None:
        sigbus.unwatch(guard)
    _munmap(address, length)


class Mapping:
    """A MAP_SHARED mapping of ``length`` bytes of ``fd`` from offset 0.

    With ``revoked_offset``, the mapping is guarded: a SIGBUS inside it (the
    object was truncated) replaces it with private zero pages whose 8-byte
    word at that offset is non-zero, and :attr:`faulted` turns true.
    Raises :class:`sigbus.TableFull` when the guard has no slot left."""

    __slots__ = ("address", "length", "writable", "locked", "view", "_backing", "_guard", "_faulted", "__weakref__")

    def __init__(self, fd: int, length: int, *, writable: bool, revoked_offset: int | None = None) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        address = _mmap(None, length, prot, mmap.MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            raise_errno("mmap")
        assert address is not None
        self.address: int = address
        self.length = length
        self.writable = writable
        self._faulted = False
        self._guard: int | None = None
        if revoked_offset is not None:
            try:
                self._guard = sigbus.watch(address, length, revoked_offset, writable)
            except BaseException:
                _munmap(address, length)
                raise
        self.locked = memlock.protect(address, length)
        backing = (ctypes.c_ubyte * length).from_address(address)
        # Every view handed out derives from this backing object, so its death
        # means no Python code can reach the range any more.
        weakref.finalize(backing, _unmap, address, length, self._guard)
        view = memoryview(backing).cast("B")
        self.view: memoryview = view if writable else view.toreadonly()
        self._backing: ctypes.Array[ctypes.c_ubyte] | None = backing

    @property
    def closed(self) -> bool:
        return self._backing is None

    @property
    def faulted(self) -> bool:
        """True once a truncation of the object made the guard replace this
        mapping with zero pages (guarded mappings only)."""
        if self._guard is not None:
            return sigbus.faulted(self._guard)
        return self._faulted

    def close(self) -> None:
        """Detach from the shared object now; see the module docstring for live views."""
        if self._backing is None:
            return
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED
        if _mmap(self.address, self.length, prot, flags, -1, 0) in (None, _MAP_FAILED):
            # Cannot happen for a range we own short of ENOMEM; unmapping
            # instead would turn live views into segfaults, so keep the
            # shared mapping and report it.
            raise_errno("mmap(MAP_FIXED) while detaching a segment")
        if self._guard is not None:
            # Only now: until the private pages are in place, a fault in
            # another thread (a view outliving close) still needs the guard.
            self._faulted = sigbus.unwatch(self._guard)
            self._guard = None
        try:
            self.view.release()
        except BufferError:
            pass  # views derived from it are alive; the finalizer unmaps later
        self.view = _RELEASED
        self._backing = None
