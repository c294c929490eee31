"""A peer in its own user namespace is "root" there, but SO_PEERCRED reports
its uid as the broker's namespace sees it: a namespace cannot forge uid 0."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import pytest

from adversary import RawPeer, error_of, hello_attach, policy_toml, write_config
from helpers import NOBODY, run_in_child

CLONE_NEWUSER = 0x10000000


def test_root_inside_a_user_namespace_is_still_nobody_to_the_broker(broker_factory: Any, short_tmp: Path) -> None:
    broker = broker_factory("--config", write_config(short_tmp, policy_toml(socket_group=NOBODY)))

    def peer() -> tuple[int, str, str]:
        libc = ctypes.CDLL(None, use_errno=True)
        # setuid() cleared the dumpable flag, which makes /proc/self/* root's.
        libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
        if libc.unshare(CLONE_NEWUSER) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"0 {NOBODY} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"0 {NOBODY} 1")
        inside = os.getuid()
        p = RawPeer(broker.socket)
        p.send(hello_attach("userns"))
        code, message = error_of(p.reply())
        p.close()
        return inside, code, message

    try:
        inside, code, message = run_in_child(peer, uid=NOBODY, gid=NOBODY)
    except Exception as exc:  # noqa: BLE001 - the kernel may forbid user namespaces
        if "unshare" in str(exc):
            pytest.skip(f"user namespaces unavailable here: {exc}")
        raise
    assert inside == 0  # root in its own namespace
    assert code == "permission_denied" and f"uid {NOBODY}" in message
    rejected = broker.events("peer_rejected")
    assert rejected and rejected[-1]["uid"] == NOBODY
