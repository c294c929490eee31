"""The shared-memory message ring (private).

``layout`` describes the bytes every peer agrees on, ``ring`` is the
single-producer / fan-out multi-consumer algorithm over any writable buffer,
``waiting`` adds spinning, sleeping on eventfds and asyncio, ``broker`` is
what the broker does to a ring (only ever through pread/pwrite).  See
docs/ring.md for the design and the memory-ordering argument.
"""
