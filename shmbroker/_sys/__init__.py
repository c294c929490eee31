"""Thin syscall wrappers, one concern per module.

Each wrapper does one kernel call (or one tightly coupled group of calls),
raises ``OSError`` with the real errno on failure, and holds no policy: the
callers decide what a failure means.
"""
