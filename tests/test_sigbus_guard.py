"""The client's SIGBUS guard (shmbroker/_guard.c, shmbroker/_sys/sigbus.py).

Every test that faults runs in a forked child or a fresh interpreter: if the
guard is broken, that process dies, not the test run.  Truncation is done on
an unsealed memfd, which behaves like a posix segment (both are tmpfs
objects) without needing a broker; the broker-level attacks are in
test_attack_shared_memory.py."""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest

from helpers import mapping_permissions, run_in_child
from shmbroker import _guard, errors
from shmbroker._layout import LAYOUT_VERSION, REVOKED, REVOKED_OFFSET, Header, segment_length
from shmbroker._sys import memfd, sigbus
from shmbroker._sys.mapping import Mapping
from shmbroker._wire import messages as m

PAGE = mmap.PAGESIZE
LENGTH = segment_length(8 * PAGE)


def _object(length: int = LENGTH) -> int:
    """An unsealed tmpfs object full of b"s" but for a zero revoked word (a
    live segment): anyone holding it can shrink it."""
    fd = memfd.memfd_create("guard-test")
    os.ftruncate(fd, length)
    os.pwrite(fd, b"s" * length, 0)
    os.pwrite(fd, REVOKED.pack(0), REVOKED_OFFSET)
    return fd


def _vm_flags(address: int) -> list[str]:
    with open("/proc/self/smaps") as f:
        current = False
        for line in f:
            if "-" in line.split()[0] and not line.startswith("VmFlags"):
                current = int(line.split("-")[0], 16) == address
            elif current and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise LookupError(hex(address))


@pytest.mark.parametrize("writable", [True, False], ids=["producer", "consumer"])
def test_a_truncated_guarded_mapping_becomes_revoked_zero_pages(writable: bool) -> None:
    def child() -> tuple[bytes, int, bool, str, list[str], bool]:
        fd = _object()
        mapping = Mapping(fd, LENGTH, writable=writable, revoked_offset=REVOKED_OFFSET)
        assert bytes(mapping.view[PAGE : PAGE + 4]) == b"ssss" and not mapping.faulted
        assert REVOKED.unpack_from(mapping.view, REVOKED_OFFSET)[0] == 0
        os.ftruncate(fd, 0)
        if writable:
            mapping.view[2 * PAGE : 3 * PAGE] = b"w" * PAGE  # the memcpy faults half-way... and completes
            assert bytes(mapping.view[2 * PAGE : 2 * PAGE + 4]) == b"wwww"
        payload = bytes(mapping.view[3 * PAGE : 4 * PAGE])
        revoked = REVOKED.unpack_from(mapping.view, REVOKED_OFFSET)[0]
        result = (
            payload[:8], revoked, mapping.faulted, mapping_permissions(mapping.address),
            _vm_flags(mapping.address), sigbus.active(),
        )
        mapping.close()
        assert mapping.faulted  # remembered after close
        return result

    payload, revoked, faulted, perms, flags, active = run_in_child(child)
    assert payload == bytes(8)
    assert revoked != 0 and faulted and active
    # Private now, read-only again for a read-only mapping; out of core dumps.
    assert perms == ("rw-p" if writable else "r--p")
    assert "dd" in flags


def test_an_untouched_guarded_mapping_is_left_alone() -> None:
    def child() -> tuple[bool, str]:
        fd = _object()
        mapping = Mapping(fd, LENGTH, writable=True, revoked_offset=REVOKED_OFFSET)
        mapping.view[PAGE] = 7
        return mapping.faulted, mapping_permissions(mapping.address)

    assert run_in_child(child) == (False, "rw-s")


_FAULT_OUTSIDE = """
import mmap, os, signal, sys, tempfile
from shmbroker._layout import REVOKED_OFFSET
from shmbroker._sys import memfd
from shmbroker._sys.mapping import Mapping

def guarded_segment():
    fd = memfd.memfd_create("guarded")
    os.ftruncate(fd, 4 * mmap.PAGESIZE)
    return Mapping(fd, 4 * mmap.PAGESIZE, writable=True, revoked_offset=REVOKED_OFFSET)

def fault_outside():
    with tempfile.TemporaryFile(dir="/dev/shm") as f:
        f.truncate(4 * mmap.PAGESIZE)
        view = mmap.mmap(f.fileno(), 4 * mmap.PAGESIZE)
        f.truncate(0)
        print("touching", flush=True)
        view[mmap.PAGESIZE] = 1  # SIGBUS, outside every guarded range
    print("survived", flush=True)
"""


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _FAULT_OUTSIDE + textwrap.dedent(script), *args],
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize("before", ["SIG_DFL", "SIG_IGN"])
def test_a_sigbus_outside_guarded_mappings_still_kills_the_process(before: str) -> None:
    proc = _run("""
        signal.signal(signal.SIGBUS, getattr(signal, sys.argv[1]))
        mapping = guarded_segment()
        from shmbroker._sys import sigbus
        assert sigbus.active()
        fault_outside()
    """, before)
    assert "touching" in proc.stdout and "survived" not in proc.stdout, proc.stderr
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stderr)


def test_a_previous_handler_gets_the_faults_outside_guarded_mappings() -> None:
    """faulthandler, enabled first (as pytest and `python -X faulthandler`
    do), is chained to: it reports the fault, and the process dies of it."""
    proc = _run("""
        import faulthandler
        faulthandler.enable()
        mapping = guarded_segment()
        fault_outside()
    """)
    assert "touching" in proc.stdout and "survived" not in proc.stdout
    assert "Fatal Python error: Bus error" in proc.stderr, proc.stderr
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stderr)


def test_a_previous_handler_does_not_see_faults_the_guard_repairs() -> None:
    proc = _run("""
        import faulthandler
        faulthandler.enable()
        mapping = guarded_segment()
        fd = memfd.memfd_create("victim")
        os.ftruncate(fd, 4 * mmap.PAGESIZE)
        victim = Mapping(fd, 4 * mmap.PAGESIZE, writable=True, revoked_offset=REVOKED_OFFSET)
        os.ftruncate(fd, 0)
        victim.view[mmap.PAGESIZE] = 1
        print("repaired" if victim.faulted else "not faulted", flush=True)
    """)
    assert proc.stdout.strip() == "repaired", proc.stderr
    assert "Fatal Python error" not in proc.stderr
    assert proc.returncode == 0


def test_a_sigbus_sent_with_kill_is_passed_on_not_swallowed() -> None:
    """A SIGBUS another process sends carries no fault address (si_code
    SI_USER): the guard hands it to the previous handler, here Python's own,
    and with none it still kills."""
    proc = _run("""
        got = []
        signal.signal(signal.SIGBUS, lambda signum, frame: got.append(signum))
        mapping = guarded_segment()
        os.kill(os.getpid(), signal.SIGBUS)
        print("python handler ran" if got == [signal.SIGBUS] else f"got {got}", flush=True)
        signal.signal(signal.SIGBUS, signal.SIG_DFL)
        second = guarded_segment()  # installs the guard again over SIG_DFL
        from shmbroker._sys import sigbus
        assert sigbus.active()
        os.kill(os.getpid(), signal.SIGBUS)
        print("survived", flush=True)
    """)
    assert proc.stdout.splitlines() == ["python handler ran"], proc.stderr
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stderr)


def test_a_handler_installed_after_the_guard_replaces_it_and_is_warned_about() -> None:
    """The documented limit: a SIGBUS handler installed later wins, and the
    next guarded mapping says so (once).  A reset to SIG_DFL is taken back
    over at the next guarded mapping."""

    def child() -> list[bool | list[str]]:
        import faulthandler
        import logging

        records: list[str] = []

        class Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record.getMessage())

        logging.getLogger("shmbroker").addHandler(Collect())
        seen: list[bool | list[str]] = []

        def guarded() -> None:
            Mapping(_object(), LENGTH, writable=True, revoked_offset=REVOKED_OFFSET).close()
            seen.append(sigbus.active())

        faulthandler.disable()  # pytest enabled it, and enable() does nothing twice
        signal.signal(signal.SIGBUS, signal.SIG_DFL)
        guarded()  # installed (again, if this process inherited it)
        faulthandler.enable()  # saves ours as its previous and replaces it
        guarded()
        guarded()  # warned only once
        faulthandler.disable()  # puts back its previous: ours
        seen.append(sigbus.active())
        signal.signal(signal.SIGBUS, signal.SIG_DFL)
        seen.append(sigbus.active())
        guarded()  # takes SIG_DFL back over
        seen.append(records)
        return seen

    *active, records = run_in_child(child)
    assert active == [True, False, False, True, False, True]
    assert isinstance(records, list) and len(records) == 1
    assert "another SIGBUS handler replaced shmbroker's" in records[0]


def test_faults_in_other_threads_are_repaired_too() -> None:
    """Several threads touching one mapping when it is truncated: each fault
    is repaired, none kills.  ctypes.memmove runs without the GIL, so the
    threads fault at the same time, in the same range."""

    def child() -> list[int]:
        rounds = []
        source = ctypes.create_string_buffer(b"t" * PAGE, PAGE)
        for _ in range(20):
            fd = _object()
            mapping = Mapping(fd, LENGTH, writable=True, revoked_offset=REVOKED_OFFSET)
            start = threading.Barrier(5)
            seen: list[int] = []

            def touch(offset: int) -> None:
                view = mapping.view
                start.wait()
                while REVOKED.unpack_from(view, REVOKED_OFFSET)[0] == 0:
                    ctypes.memmove(mapping.address + offset, source, PAGE)
                seen.append(offset)

            threads = [threading.Thread(target=touch, args=((1 + i) * PAGE,)) for i in range(4)]
            for t in threads:
                t.start()
            start.wait()
            os.ftruncate(fd, 0)
            for t in threads:
                t.join(10)
            assert mapping.faulted
            mapping.close()
            os.close(fd)
            rounds.append(len(seen))
        return rounds

    assert run_in_child(child, timeout=60) == [4] * 20


def test_a_forked_child_inherits_the_guard() -> None:
    def child() -> tuple[int, bool, bool]:
        fd = _object()
        mapping = Mapping(fd, LENGTH, writable=False, revoked_offset=REVOKED_OFFSET)
        pid = os.fork()
        if pid == 0:
            os.ftruncate(fd, 0)
            ok = bytes(mapping.view[PAGE : PAGE + 8]) == bytes(8) and mapping.faulted
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        # The child's repair was its own: here the mapping is still the
        # shared one of the truncated object, and faults in its turn.
        before = mapping.faulted
        bytes(mapping.view[PAGE : PAGE + 8])
        return status, before, mapping.faulted

    assert run_in_child(child) == (0, False, True)


def test_close_and_garbage_collection_give_the_slot_back() -> None:
    """More mappings over time than the guard has slots: each close (or the
    finalizer of a mapping never closed) frees its slot, and a stale token
    never names a later mapping."""

    def child() -> tuple[str, str]:
        fd = _object(2 * PAGE)
        token = 0
        for i in range(_guard.SLOTS + 50):
            mapping = Mapping(fd, 2 * PAGE, writable=True, revoked_offset=REVOKED_OFFSET)
            assert mapping._guard is not None
            token = mapping._guard
            if i % 2:
                mapping.close()
            else:
                del mapping  # no cycles: its views and finalizer go at once
        stale = ""
        try:
            _guard.faulted(token)
        except ValueError as exc:
            stale = str(exc)
        return stale, "ok"

    stale, ok = run_in_child(child, timeout=60)
    assert "no mapping is registered under this token" in stale and ok == "ok"


def test_a_full_guard_table_refuses_the_attachment() -> None:
    """The client never maps a segment unguarded: with every slot taken,
    attaching fails with LimitExceeded and leaves nothing mapped."""
    from shmbroker._client import _map_segment

    def child() -> str:
        region = mmap.mmap(-1, (_guard.SLOTS + 1) * PAGE)
        anchor = ctypes.c_char.from_buffer(region)
        address = ctypes.addressof(anchor)
        # Take every free slot (this fork of the test process may hold some).
        taken = 0
        with pytest.raises(_guard.TableFull):
            for i in range(_guard.SLOTS + 1):
                _guard.register(address + i * PAGE, PAGE, 0, True)
                taken += 1
        assert 0 < taken <= _guard.SLOTS
        fd = memfd.memfd_create("shmbroker")
        os.fchmod(fd, 0)
        os.ftruncate(fd, segment_length(4096))
        os.pwrite(fd, Header(size=4096, generation=1).pack(), 0)
        memfd.add_seals(fd, memfd.SIZE_SEALS)
        reply = m.Attached(channel="x", role="consumer", size=4096, generation=1, layout=LAYOUT_VERSION, fds=("segment",))
        before = open("/proc/self/maps").read().count("memfd:shmbroker")
        try:
            _map_segment(reply, [fd])
        except errors.LimitExceeded as exc:
            after = open("/proc/self/maps").read().count("memfd:shmbroker")
            assert after == before, "a refused segment stayed mapped"
            return str(exc)
        return "mapped"

    assert "guarded mappings" in run_in_child(child, timeout=60)


@pytest.mark.parametrize(
    "args, message",
    [
        ((1, PAGE, 0, True), "whole pages"),
        ((PAGE, PAGE + 1, 0, True), "whole pages"),
        ((PAGE, 0, 0, True), "whole pages"),
        ((PAGE, PAGE, 4, True), "aligned 8-byte word"),
        ((PAGE, PAGE, PAGE - 4, True), "aligned 8-byte word"),
        ((PAGE, PAGE, PAGE, True), "aligned 8-byte word"),
    ],
)
def test_register_refuses_ranges_it_could_not_repair(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _guard.register(*args)


def test_register_refuses_overlaps_and_unregister_refuses_unknown_tokens() -> None:
    def child() -> list[str]:
        region = mmap.mmap(-1, 4 * PAGE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(region))
        token = _guard.register(address, 2 * PAGE, 0, True)
        errors_seen = []
        for call in (
            lambda: _guard.register(address + PAGE, 2 * PAGE, 0, True),
            lambda: _guard.unregister(token + _guard.SLOTS),  # same slot, another generation
        ):
            try:
                call()
            except ValueError as exc:
                errors_seen.append(str(exc))
        assert _guard.unregister(token) is False
        again = _guard.register(address + PAGE, 2 * PAGE, 0, True)  # free now
        _guard.unregister(again)
        return errors_seen

    seen = run_in_child(child)
    assert len(seen) == 2 and "overlaps" in seen[0] and "no mapping is registered" in seen[1]


def test_a_guard_that_never_loads_says_what_to_install() -> None:
    """Without the C extension no segment is ever mapped unguarded: the first
    guarded mapping refuses, naming the build requirements, and leaves no
    mapping behind.  The package itself still imports, so the broker, which
    never maps a segment, runs from a zipapp (issue 15)."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent("""
            import os, sys
            sys.modules["shmbroker._guard"] = None  # as if it had never been built
            import shmbroker
            from shmbroker._sys import mapping
            fd = os.memfd_create("unguarded")
            os.ftruncate(fd, 4096)
            try:
                mapping.Mapping(fd, 4096, writable=True, revoked_offset=8)
            except ImportError as exc:
                print(exc)
            with open("/proc/self/maps") as f:
                print("still mapped" if "memfd:unguarded" in f.read() else "nothing mapped")
        """)],
        capture_output=True, text=True, timeout=60,
    )
    assert "gcc" in proc.stdout and "python3-dev" in proc.stdout, (proc.stdout, proc.stderr)
    assert "nothing mapped" in proc.stdout


# -- what the guard cannot do (docs/attacks.md, A6) ----------------------------
@pytest.mark.xfail(strict=True, reason="a SIGBUS handler installed after the guard replaces it (docs/attacks.md, A6)")
def test_a_truncation_is_survived_even_after_the_application_replaced_the_guard() -> None:
    proc = _run("""
        import faulthandler
        first = guarded_segment()  # the guard is installed here...
        faulthandler.enable()  # ...and replaced here
        fd = memfd.memfd_create("victim")
        os.ftruncate(fd, 4 * mmap.PAGESIZE)
        victim = Mapping(fd, 4 * mmap.PAGESIZE, writable=True, revoked_offset=REVOKED_OFFSET)
        os.ftruncate(fd, 0)
        victim.view[mmap.PAGESIZE] = 1
    """)
    assert proc.returncode == 0, f"died of {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else proc.stderr


@pytest.mark.xfail(strict=True, reason="the kernel signals nothing when a system call meets the truncation: EFAULT (docs/attacks.md, A6)")
def test_a_syscall_touching_a_truncated_segment_sees_a_revoked_segment() -> None:
    def child() -> str:
        fd = _object()
        mapping = Mapping(fd, LENGTH, writable=True, revoked_offset=REVOKED_OFFSET)
        r, w = os.pipe()
        os.ftruncate(fd, 0)
        try:
            os.write(w, mapping.view[PAGE : PAGE + 64])
        except OSError as exc:
            return f"{os.strerror(exc.errno or 0)}, faulted={mapping.faulted}"
        return "ok"

    assert run_in_child(child) == "ok"
