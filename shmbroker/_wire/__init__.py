"""The wire protocol, sans-IO: bytes in, events out, no sockets.

``frames`` splits a byte stream into length-prefixed frames, ``messages``
turns a frame into a validated, typed message, and ``connection`` enforces
which message may come when.  Nothing here touches a file descriptor, so it
can be property-tested and fuzzed without a broker.
"""
