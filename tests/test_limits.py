"""Limits refuse bad values at construction, so a config typo cannot weaken them."""

from __future__ import annotations

import pytest

from shmbroker.limits import DEFAULT_LIMITS, Limits


def test_defaults_follow_cited_precedents() -> None:
    assert DEFAULT_LIMITS.handshake_timeout == 30.0  # dbus-daemon auth_timeout
    assert DEFAULT_LIMITS.max_incomplete_connections == 64  # dbus-daemon
    assert DEFAULT_LIMITS.max_connections_per_uid == 256  # dbus-daemon system bus


@pytest.mark.parametrize(
    "values, message",
    [
        ({"max_frame_size": 0}, "must be positive"),
        ({"max_connections": -3}, "must be positive"),
        ({"max_connections": 1.5}, "whole number"),
        ({"handshake_timeout": True}, "must be a number"),
        ({"handshake_timeout": "30"}, "must be a number"),
        ({"max_segment_size": 100}, "at least 4096"),
        ({"max_conections": 10}, "unknown limit 'max_conections'"),
    ],
)
def test_invalid_limits_are_refused(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Limits.from_mapping(values)


def test_overrides_apply() -> None:
    limits = Limits.from_mapping({"max_connections": 10, "handshake_timeout": 0.5})
    assert limits.max_connections == 10
    assert limits.handshake_timeout == 0.5
    assert limits.max_frame_size == DEFAULT_LIMITS.max_frame_size
