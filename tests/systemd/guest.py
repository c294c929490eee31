"""The checks `make test-systemd` runs inside a booted systemd 252 (issue 15).

Runs as shmbroker-check.service (root) in a systemd-nspawn container where
the shipped units are installed unchanged but for their ExecStart path
(tests/test_systemd_boot.py sets that up).  Every item of the issue is one
step; each step records what it observed, and a failing step does not stop
the others.  The report goes to RESULTS/report.json, read by the host.

    python guest.py RESULTS_DIR
"""

from __future__ import annotations

import json
import os
import re
import select
import stat
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

RESULTS = sys.argv[1] if len(sys.argv) > 1 else "/results"
PREFIX = "/opt/shmbroker"  # where the host bound the installed venv
PYTHON = f"{PREFIX}/bin/python"
SHMBROKER = f"{PREFIX}/bin/shmbroker"
CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "client.py")
SOCKET = "/run/shmbroker/broker.sock"
SERVICE, SOCKET_UNIT = "shmbroker.service", "shmbroker.socket"
CONFIG = "/etc/shmbroker/broker.toml"
# The unit's WatchdogSec=30s, plus restart and slack.
WATCHDOG_WAIT = 75.0
# A security event's MESSAGE_ID (shmbroker/_logging.py).
SECURITY_EVENT_ID = "4a6ec9db0e314ace80429d8a63e3c0ae"

report: dict[str, dict[str, Any]] = {}


def record(item: str, ok: bool, observed: str) -> None:
    report[item] = {"ok": bool(ok), "observed": observed}
    log(f"{'PASS' if ok else 'FAIL'} {item}: {observed}")


def log(text: str) -> None:
    with open(os.path.join(RESULTS, "guest.log"), "a") as f:
        f.write(f"{time.monotonic():9.3f} {text}\n")


def step(item: str) -> Callable[[Callable[[], str]], None]:
    """Run the step now; it returns what it observed, or raises with why not."""
    def run(fn: Callable[[], str]) -> None:
        log(f"step {item}")
        try:
            record(item, True, fn())
        except Exception as exc:
            record(item, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    return run


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc


def show(unit: str, *props: str) -> dict[str, str]:
    out = sh("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(*args: str) -> list[dict[str, Any]]:
    out = sh("journalctl", "--no-pager", "-o", "json", *args).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def messages(entries: list[dict[str, Any]]) -> list[str]:
    return [e["MESSAGE"] if isinstance(e.get("MESSAGE"), str) else "" for e in entries]


def wait(what: str, predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def user_command(user: str, *args: str) -> list[str]:
    # A clean environment: no SHMBROKER_SOCKET, no XDG_RUNTIME_DIR, so the
    # client has to find the system broker by itself.
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
            "env", "-i", "PATH=/usr/bin:/bin", "LANG=C.UTF-8", PYTHON, CLIENT, *args]


def service_command(unit: str, user: str, *args: str) -> list[str]:
    """The client as a transient system service ``unit`` of ``user``: what
    systemd runs is in that unit's cgroup, as any packaged service is."""
    return ["systemd-run", "--quiet", "--wait", "--pipe", f"--unit={unit}", "-p", f"User={user}",
            "--", PYTHON, CLIENT, *args]


class Holder:
    """A client process of ``user`` holding an attachment, driven line by line."""

    def __init__(self, user: str, role: str, channel: str, command: list[str] | None = None) -> None:
        self.proc = subprocess.Popen(
            command or user_command(user, role, channel), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        self.hello = self._answer()
        if not self.hello.get("ok"):
            raise AssertionError(f"{user} could not attach as {role}: {self.hello}")

    def _answer(self, timeout: float = 20.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            err = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
            raise AssertionError(f"client gave no answer (exit {self.proc.poll()}): {err}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask("close")
            except Exception:
                self.proc.kill()
        self.proc.wait(10)


def once(user: str, *args: str) -> dict[str, Any]:
    out = sh(*user_command(user, *args), check=False)
    if not out.stdout.strip():
        raise AssertionError(f"client of {user} printed nothing: {out.stderr}")
    answer: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return answer


def status() -> dict[str, Any]:
    # As root, with no --socket: the fallback path, and root may always ask.
    out = sh(SHMBROKER, "status", "--json")
    reply: dict[str, Any] = json.loads(out.stdout)
    return reply


def main_pid() -> int:
    return int(show(SERVICE, "MainPID")["MainPID"])


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def uid_of(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


# -- setup ---------------------------------------------------------------------
def setup() -> None:
    sh("groupadd", "--system", "shmops")
    # alice may attach; mallory reaches the socket (socket group) but no rule
    # names her; oper is an operator (status) and in the socket group to reach it.
    for user, groups in (("alice", "shmbroker"), ("mallory", "shmbroker"), ("oper", "shmbroker,shmops")):
        sh("useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", "--groups", groups, user)
    with open(CONFIG, "w") as f:
        f.write(
            '[broker]\nuser = "shmbroker"\noperator_group = "shmops"\n\n'
            '[channels.secrets]\nsize = "1MiB"\n\n'
            '[channels.frames]\nsize = "1MiB"\n\n'
            '[[rules]]\nuids = ["alice"]\nexecutables = ["/usr/bin/python3.11"]\nchannels = ["secrets"]\n\n'
            # Issue 17: only alice's camera.service may use frames; her
            # plugin.service runs the same interpreter.
            '[[rules]]\nuids = ["alice"]\nexecutables = ["/usr/bin/python3.11"]\nunits = ["camera.service"]\n'
            'channels = ["frames"]\n'
        )
    os.chown(CONFIG, 0, 0)
    os.chmod(CONFIG, 0o644)


def main() -> int:
    os.makedirs(RESULTS, exist_ok=True)
    try:
        setup()
    except Exception:
        record("setup", False, traceback.format_exc())
        return finish()
    holders: list[Holder] = []
    state: dict[str, Any] = {}

    @step("socket_waits_for_a_client")
    def _() -> str:
        units = show(SOCKET_UNIT, "ActiveState", "SubState")
        service = show(SERVICE, "ActiveState")
        st, dst = os.stat(SOCKET), os.stat(os.path.dirname(SOCKET))
        import grp
        import pwd

        assert units["ActiveState"] == "active" and units["SubState"] == "listening", units
        assert service["ActiveState"] == "inactive", service
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert pwd.getpwuid(st.st_uid).pw_name == "shmbroker" and grp.getgrgid(st.st_gid).gr_name == "shmbroker"
        assert stat.S_IMODE(dst.st_mode) == 0o750
        return (f"{SOCKET_UNIT} listening, {SERVICE} inactive; {SOCKET} mode 0660 shmbroker:shmbroker "
                f"in a 0750 directory")

    @step("socket_activation")
    def _() -> str:
        before = show(SERVICE, "ActiveState")["ActiveState"]
        producer = Holder("alice", "producer", "secrets")
        holders.append(producer)
        pid = main_pid()
        state["pid"] = pid
        after = show(SERVICE, "ActiveState", "SubState")
        assert before == "inactive" and after["ActiveState"] == "active" and pid > 0, (before, after)
        return (f"alice (socket group shmbroker, no SHMBROKER_SOCKET, no XDG_RUNTIME_DIR) attached through {SOCKET}; "
                f"{SERVICE} went {before} -> {after['ActiveState']}/{after['SubState']}, MainPID {pid}")

    @step("notify_readiness")
    def _() -> str:
        props = show(SERVICE, "Type", "NotifyAccess", "StatusText", "WatchdogUSec", "SubState")
        assert props["Type"] == "notify" and props["SubState"] == "running", props
        # STATUS= is sent only with READY=1 (sdnotify.Notifier.ready).
        assert props["StatusText"].startswith("listening on "), props
        entries = journal("_SYSTEMD_UNIT=" + SERVICE, "+", "UNIT=" + SERVICE)
        sandboxed = next(e for e in entries if str(e.get("MESSAGE", "")).startswith("landlock ABI"))
        started = next(e for e in entries if str(e.get("MESSAGE", "")).startswith("Started shmbroker.service"))
        assert int(sandboxed["__REALTIME_TIMESTAMP"]) <= int(started["__REALTIME_TIMESTAMP"])
        return (f"Type=notify, SubState=running, StatusText={props['StatusText']!r} (sent with READY=1), "
                f"WatchdogUSec={props['WatchdogUSec']}; systemd logged 'Started' after the broker's Landlock line")

    @step("landlock_and_seccomp_in_force")
    def _() -> str:
        c = status()["confinement"]
        pid = main_pid()
        proc = proc_status(pid)
        ll, sc = c["landlock"], c["seccomp"]
        assert ll["state"] == "enforced" and ll["verified"] and ll["abi"] > 0, ll
        assert sc["mode"] == 2 and sc["broker_filter"] == "enforce" and (sc["filters"] or 0) >= 2, sc
        assert proc["Seccomp"] == "2" and proc["NoNewPrivs"] == "1", proc
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(x) for x in f.read().split()]
        inspector = proc_status(children[0]) if children else {}
        assert inspector.get("Seccomp") == "2", inspector
        unit_log = "\n".join(messages(journal("_SYSTEMD_UNIT=" + SERVICE)))
        assert "no Landlock" not in unit_log and "blocked" not in unit_log, unit_log
        return (f"status: Landlock enforced, ABI {ll['abi']}, {ll['rules']} rules, reading / denied; "
                f"seccomp {sc['mode_name']} with {sc['filters']} filters (systemd's and the broker's own "
                f"'{sc['broker_filter']}' allowlist); /proc/{pid}/status Seccomp 2, NoNewPrivs 1; "
                f"exe inspector pid {children[0]} Seccomp 2; no 'no Landlock'/'blocked' warning in the journal")

    @step("confinement_report")
    def _() -> str:
        s = status()
        c = s["confinement"]
        assert c["user"]["name"] == "shmbroker" and c["user"]["euid"] == uid_of("shmbroker"), c["user"]
        assert c["capabilities"]["effective"] == ["CAP_SYS_PTRACE"], c["capabilities"]
        assert c["no_new_privs"] and c["dumpable"] == 0 and c["rlimit_core"] == {"soft": 0, "hard": 0}, c
        doctor = sh(SHMBROKER, "doctor", "--json", "--broker", check=False)
        check = {d["name"]: d for d in json.loads(doctor.stdout)}["running broker"]
        assert check["status"] == "ok", check
        return (f"user {c['user']['name']} (uid {c['user']['euid']}), effective caps {c['capabilities']['effective']}, "
                f"no_new_privs, dumpable 0, RLIMIT_CORE 0/0; `doctor --broker`: {check['status'].upper()} {check['detail']}")

    @step("operator_group_may_query_status")
    def _() -> str:
        oper = once("oper", "status")
        mallory = once("mallory", "status")
        assert oper["ok"] and oper["pid"] == main_pid(), oper
        assert not mallory["ok"] and mallory["error"] == "PermissionDenied", mallory
        return (f"root: `shmbroker status` with no options answered; oper (group shmops = operator_group): "
                f"status answered; mallory: {mallory['error']}")

    @step("other_uid_refused_and_recorded")
    def _() -> str:
        refused = once("mallory", "once", "producer", "secrets")
        assert not refused["ok"] and refused["error"] == "PermissionDenied", refused
        events = [e for e in status()["security_events"] if e["kind"] == "peer_rejected" and e["uid"] == uid_of("mallory")]
        assert events, status()["security_events"]
        return f"mallory (uid {uid_of('mallory')}): {refused['message']!r}; status: peer_rejected {events[-1]['detail']!r}"

    @step("units_tell_same_interpreter_services_apart")
    def _() -> str:
        camera = Holder("alice", "producer", "frames", service_command("camera.service", "alice", "producer", "frames"))
        try:
            pid = int(show("camera.service", "MainPID")["MainPID"])
            with open(f"/proc/{pid}/cgroup") as f:
                where = f.read().strip().splitlines()[-1]
            exe = os.path.realpath(f"/proc/{pid}/exe")
            peers = [p for c in status()["channels"] if c["name"] == "frames" for p in c["peers"]]
            assert [(p["pid"], p["unit"]) for p in peers] == [(pid, "camera.service")], (peers, where)
            out = sh(*service_command("plugin.service", "alice", "once", "producer", "frames"), check=False)
            refused = json.loads(out.stdout.splitlines()[-1]) if out.stdout.strip() else {"stderr": out.stderr}
            assert not refused.get("ok") and refused.get("error") == "PermissionDenied", refused
            events = [e for e in status()["security_events"]
                      if e["uid"] == uid_of("alice") and "unit plugin.service" in e["detail"]]
            assert events and events[-1]["kind"] == "request_refused", status()["security_events"]
            assert os.path.realpath(events[-1]["exe"]) == exe, (events[-1], exe)
        finally:
            camera.close()
        return (f"camera.service and plugin.service, both alice running {exe}: camera (pid {pid}, {where}) "
                f"attached to frames and status shows unit {peers[0]['unit']!r}; plugin: {refused['message']!r}; "
                f"status: {events[-1]['kind']} {events[-1]['detail']!r}")

    @step("journal_structured_fields")
    def _() -> str:
        entries = journal("_SYSTEMD_UNIT=" + SERVICE, "SHMBROKER_EVENT=peer_rejected")
        mine = [e for e in entries if e.get("SHMBROKER_PEER_UID") == str(uid_of("mallory"))]
        assert mine, entries
        e = mine[-1]
        assert e.get("PRIORITY") == "4" and e.get("MESSAGE_ID") == SECURITY_EVENT_ID, e
        assert e.get("SYSLOG_IDENTIFIER") == "shmbroker" and str(e.get("CODE_FILE", "")).endswith(".py"), e
        fields = {k: e[k] for k in sorted(e) if k.startswith(("SHMBROKER_", "CODE_", "PRIORITY", "MESSAGE_ID", "SYSLOG_ID"))}
        return f"journalctl SHMBROKER_EVENT=peer_rejected found mallory's refusal with {fields}"

    @step("usr1_wipes")
    def _() -> str:
        producer = holders[0]
        consumer = Holder("alice", "consumer", "secrets")
        holders.append(consumer)
        producer.ask("write TOPSECRET")
        assert consumer.ask("read 9")["data"] == "TOPSECRET"
        sh("systemctl", "kill", "-s", "USR1", SERVICE)
        # The revoked word is set before the payload is overwritten, and the
        # client reads the data before the word: one answer can say revoked
        # and still hold the secret, read a moment earlier (seen once).
        # What the panic promises is the wipe, so wait for it.
        seen = wait("the panic wipe", lambda: (r := consumer.ask("read 9"))["revoked"] and r["data"] == "\0" * 9 and r)
        assert seen["data"] == "\0" * 9, seen
        panic = [e for e in status()["security_events"] if e["kind"] == "panic_wipe"]
        assert panic, "no panic_wipe event"
        again = once("alice", "once", "producer", "secrets")
        assert again["ok"], again
        return (f"after `systemctl kill -s USR1 {SERVICE}` (every process of the unit) alice's consumer read "
                f"{len(seen['data'])} zero bytes, revoked; status: {panic[-1]['detail']!r}; a new attach was "
                "verified afterwards (the exe inspector survived the signal)")

    @step("watchdog_restart")
    def _() -> str:
        for h in holders:
            h.close()
        holders.clear()
        pid, restarts = main_pid(), int(show(SERVICE, "NRestarts")["NRestarts"])
        started = time.monotonic()
        os.kill(pid, 19)  # SIGSTOP: the loop stops pinging
        new = wait("a restarted broker", lambda: (p := main_pid()) not in (0, pid) and
                   show(SERVICE, "SubState")["SubState"] == "running" and p, timeout=WATCHDOG_WAIT)
        elapsed = time.monotonic() - started
        after = int(show(SERVICE, "NRestarts")["NRestarts"])
        timeout_logged = any("Watchdog timeout" in m for m in messages(journal("UNIT=" + SERVICE)))
        assert after == restarts + 1 and timeout_logged, (after, restarts, timeout_logged)
        assert once("alice", "once", "producer", "secrets")["ok"]
        return (f"SIGSTOP to MainPID {pid}: systemd logged 'Watchdog timeout' and restarted it as {new} after "
                f"{elapsed:.0f}s (WatchdogSec=30s), NRestarts {restarts} -> {after}; the new broker serves")

    @step("stop_wipes_and_removes_socket")
    def _() -> str:
        producer = Holder("alice", "producer", "secrets")
        consumer = Holder("alice", "consumer", "secrets")
        holders.extend([producer, consumer])
        producer.ask("write TOPSECRET")
        assert consumer.ask("read 9")["data"] == "TOPSECRET"
        sh("systemctl", "stop", SOCKET_UNIT, SERVICE)
        seen = consumer.ask("read 9")
        props = show(SERVICE, "ActiveState", "Result", "ExecMainStatus")
        last = messages(journal("_SYSTEMD_UNIT=" + SERVICE))[-3:]
        assert seen["revoked"] and seen["data"] == "\0" * 9, seen
        assert not os.path.exists(SOCKET), "socket left behind"
        assert props["ActiveState"] == "inactive" and props["Result"] == "success" and props["ExecMainStatus"] == "0", props
        assert any("every segment was wiped" in m for m in last), last
        return (f"`systemctl stop {SOCKET_UNIT} {SERVICE}`: the consumer read zeros, revoked; {SOCKET} gone; "
                f"Result={props['Result']}, exit status {props['ExecMainStatus']}; last log line {last[-1]!r}")

    @step("exposure")
    def _() -> str:
        out = sh("systemd-analyze", "security", SERVICE, "--no-pager", check=False).stdout
        match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\S+)", out)
        assert match, out
        score = float(match.group(1))
        assert score <= 1.5, out
        return f"systemd-analyze security {SERVICE}: {score} {match.group(2)}"

    @step("documentation_exists")
    def _() -> str:
        docs = show(SERVICE, "Documentation")["Documentation"].split()
        found = []
        for uri in docs:
            assert uri.startswith("file:///usr/"), uri
            # The unit names the /usr install a distribution makes; here the
            # package is installed under PREFIX, as ExecStart says.
            path = PREFIX + uri[len("file:///usr"):]
            assert os.path.isfile(path), f"{uri}: no {path} in the installed package"
            found.append(f"{uri} (installed as {path})")
        assert found
        return "; ".join(found)

    for h in holders:
        try:
            h.close()
        except Exception:
            pass
    return finish()


def finish() -> int:
    with open(os.path.join(RESULTS, "journal.txt"), "w") as f:
        f.write(sh("journalctl", "--no-pager", "-o", "short-precise", check=False).stdout)
    with open(os.path.join(RESULTS, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
