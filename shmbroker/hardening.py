"""Process hardening for the broker and (opt-in) for clients.

:func:`harden_process` follows JoinMarket's ``harden_current_process()`` and
the secmem-proc crate: no core dumps, not dumpable (so neither ptrace nor
/proc/PID/mem, environ, maps... are open to same-uid processes), no new
privileges across execve, and a capability set cut to what the broker needs.

Every step is idempotent and non-fatal: a step the kernel refuses is logged
as skipped and the others still apply, so hardening never stops a broker
from serving.  ``SHMBROKER_DISABLE_HARDENING=1`` turns the whole thing off
(for debugging with gdb or core dumps) and says so with a warning.

Capabilities kept by the broker, and why:

* ``CAP_SYS_PTRACE``: reading ``/proc/PID/exe`` needs PTRACE_MODE_READ on the
  peer.  A peer of another uid, or one that made itself non-dumpable (for
  example with ``ShmClient.attach(..., harden=True)``), can only be verified
  by a broker holding CAP_SYS_PTRACE; without it such peers are rejected
  (fail closed), never admitted unverified.
* ``CAP_CHOWN``, only when ``[broker] socket_group`` is configured: the
  listener chowns its socket to that group at startup.

Everything else (CAP_DAC_OVERRIDE, CAP_SYS_ADMIN, CAP_SETUID...) is dropped
from the effective, permitted, inheritable, ambient and bounding sets, so
neither the broker nor anything it could ever exec regains it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
from collections.abc import Callable, Iterable

from ._sys import prctl as _prctl

log = logging.getLogger(__name__)

DISABLE_ENV = "SHMBROKER_DISABLE_HARDENING"
BROKER_CAPABILITIES = frozenset({_prctl.CAP_SYS_PTRACE})

try:  # optional extra `prctl`: the maintained binding, preferred when present
    import prctl as _python_prctl
except ImportError:  # pragma: no cover - depends on the environment
    _python_prctl = None


@dataclasses.dataclass
class HardeningReport:
    """What :func:`harden_process` did; ``skipped`` maps a step to the reason."""

    applied: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    disabled: bool = False
    kept_capabilities: list[int] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.disabled and not self.skipped


def harden_process(*, keep_capabilities: Iterable[int] | None = None, drop_capabilities: bool = True) -> HardeningReport:
    """Make this process undumpable and unprivileged; see the module docstring.

    ``keep_capabilities`` lists capability numbers to keep (default: only
    CAP_SYS_PTRACE).  Clients pass ``drop_capabilities=False``: an application
    decides its own capabilities.
    """
    report = HardeningReport()
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        report.disabled = True
        log.warning(
            "%s is set: process hardening is OFF (core dumps and same-uid ptrace can expose segment contents)",
            DISABLE_ENV,
        )
        return report
    _step(report, "RLIMIT_CORE=0", lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)))
    _step(report, "PR_SET_DUMPABLE=0", lambda: _prctl.prctl(_prctl.PR_SET_DUMPABLE, 0))
    _step(report, "PR_SET_NO_NEW_PRIVS", lambda: _prctl.prctl(_prctl.PR_SET_NO_NEW_PRIVS, 1))
    if drop_capabilities:
        keep = frozenset(BROKER_CAPABILITIES if keep_capabilities is None else keep_capabilities)
        _drop_capabilities(report, keep)
    if report.applied:
        log.info("hardening applied: %s", ", ".join(report.applied))
    for step, reason in report.skipped.items():
        log.warning("hardening step %s skipped: %s", step, reason)
    return report


def _step(report: HardeningReport, name: str, fn: Callable[[], object]) -> None:
    try:
        fn()
    except (OSError, ValueError) as exc:
        report.skipped[name] = getattr(exc, "strerror", None) or str(exc)
    else:
        report.applied.append(name)


def _drop_capabilities(report: HardeningReport, keep: frozenset[int]) -> None:
    effective, permitted, _ = _prctl.get_caps()
    report.kept_capabilities = sorted(c for c in keep if permitted >> c & 1)
    last = _prctl.last_cap()
    # The bounding set first: dropping from it needs CAP_SETPCAP, which goes
    # with the permitted set right after.
    in_bounding = [c for c in range(last + 1) if c not in keep and _bounding_has(c)]
    if in_bounding:
        if effective >> _prctl.CAP_SETPCAP & 1:
            _step(report, "drop bounding capabilities", lambda: _drop_bounding(in_bounding))
        elif permitted & ~sum(1 << c for c in keep):
            report.skipped["drop bounding capabilities"] = "no CAP_SETPCAP to shrink the bounding set"
        # else: an unprivileged process with no_new_privs cannot gain
        # capabilities through exec, so the bounding set does not matter.
    _step(report, "clear ambient capabilities", lambda: _prctl.prctl(_prctl.PR_CAP_AMBIENT, _prctl.PR_CAP_AMBIENT_CLEAR_ALL))
    mask = sum(1 << c for c in keep)
    if permitted & ~mask:
        _step(report, "drop capabilities", lambda: _limit_sets(keep, permitted & mask))


def _bounding_has(cap: int) -> bool:
    try:
        return _prctl.prctl(_prctl.PR_CAPBSET_READ, cap) == 1
    except OSError:
        return False  # the kernel does not know this cap


def _drop_bounding(caps: list[int]) -> None:
    for cap in caps:
        if _python_prctl is not None and cap <= _python_prctl.CAP_LAST_CAP:
            _python_prctl.capbset.drop(cap)
        else:
            _prctl.prctl(_prctl.PR_CAPBSET_DROP, cap)


def _limit_sets(keep: frozenset[int], kept_mask: int) -> None:
    if _python_prctl is not None:
        caps = [c for c in keep if kept_mask >> c & 1]
        _python_prctl.cap_inheritable.limit()
        _python_prctl.cap_effective.limit(*caps)
        _python_prctl.cap_permitted.limit(*caps)
    else:
        _prctl.set_caps(kept_mask, kept_mask, 0)
