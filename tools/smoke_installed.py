#!/usr/bin/env python3
"""Smoke run of shmbroker installed from a wheel, outside the checkout, under
a given interpreter (`make smoke PYTHON=/usr/bin/python3.11`; .ci/run runs
it with Debian's).

In a fresh directory under /tmp: a venv of that interpreter (with its
system site-packages, so Debian's python3-msgpack is used when installed),
a wheel built from a copy of this tree and installed into it, then, from
that directory and with that venv only:

1. the demo (examples/demo.py: broker, producer, consumer, nothing left);
2. a cross-uid attach: a root broker, a client running as nobody;
3. a ring round trip with --landlock on, and status saying Landlock is
   enforced and verified;
4. `shmbroker bench --quick --peers shmbroker,pipe`;
5. the installed metadata (license, URLs) and documentation.

Exits 0 when all pass; otherwise prints which step failed, with the broker's
log, and exits 1.  Needs root for step 2 (skipped, and said so, otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Wheel build (compiles the C extension) and installs: generous for a slow machine.
INSTALL_TIMEOUT = 900
STEP_TIMEOUT = 300


class StepFailed(Exception):
    pass


def run(cmd: list[str], *, cwd: Path, timeout: float = STEP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise StepFailed(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def install(python: str, work: Path) -> Path:
    venv = work / "venv"
    run([python, "-m", "venv", "--system-site-packages", str(venv)], cwd=work, timeout=INSTALL_TIMEOUT)
    source = work / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "*.so",
    ))
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    run([*pip, "wheel", "--no-deps", "-w", str(work / "wheels"), str(source)], cwd=work, timeout=INSTALL_TIMEOUT)
    wheel = next((work / "wheels").glob("shmbroker-*.whl"))
    run([*pip, "install", str(wheel)], cwd=work, timeout=INSTALL_TIMEOUT)
    shutil.rmtree(source)
    return venv


class Broker:
    def __init__(self, venv: Path, work: Path, name: str, *args: str) -> None:
        self.socket = work / name / "broker.sock"
        self.log = work / f"{name}.log"
        self.proc = subprocess.Popen(
            [str(venv / "bin" / "shmbroker"), "serve", "--socket", str(self.socket), "-v", *args],
            cwd=work, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"),
        )
        self.venv, self.work = venv, work
        deadline = time.monotonic() + 30
        while "listening on" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise StepFailed(f"the broker did not come up; its log:\n{self.log.read_text()}")
            time.sleep(0.05)

    def status(self) -> dict[str, object]:
        out = run([str(self.venv / "bin" / "shmbroker"), "status", "--json", "--socket", str(self.socket)], cwd=self.work)
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def step_demo(venv: Path, work: Path) -> str:
    out = run([str(venv / "bin" / "python"), str(REPO / "examples" / "demo.py")], cwd=work)
    last = [line for line in out.stdout.splitlines() if line.strip()][-1]
    if not last.startswith("OK"):
        raise StepFailed(out.stdout + out.stderr)
    return last


def step_cross_uid(venv: Path, work: Path) -> str:
    if os.geteuid() != 0:
        return "SKIPPED: needs root to run the client as nobody"
    nobody = pwd.getpwnam("nobody")
    config = work / "cross.toml"
    config.write_text(
        f'[broker]\nsocket_group = {nobody.pw_gid}\n\n[[rules]]\nuids = ["nobody"]\n'
        f'executables = ["{os.path.realpath(venv / "bin" / "python")}"]\ncreate = true\n'
    )
    broker = Broker(venv, work, "cross", "--config", str(config))
    try:
        client = textwrap.dedent(f"""
            import os
            from shmbroker import ShmClient
            with ShmClient.attach("x", "producer", socket_path={str(broker.socket)!r}, size=4096) as p:
                p.buf[:5] = b"hello"
            print("uid", os.getuid(), "attached")
        """)
        out = run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                   str(venv / "bin" / "python"), "-c", client], cwd=work)
        peers = broker.status()["counters"]
        return f"{out.stdout.strip()} to a root broker ({peers})"
    finally:
        broker.stop()


def step_ring(venv: Path, work: Path) -> str:
    broker = Broker(venv, work, "ring", "--landlock", "on", "--channel", "events:1MiB:ring")
    try:
        client = textwrap.dedent(f"""
            from shmbroker import ShmClient
            path = {str(broker.socket)!r}
            with ShmClient.attach("events", "producer", socket_path=path) as p, \\
                 ShmClient.attach("events", "consumer", socket_path=path) as c:
                p.send_many([b"one", b"two"])
                got = [c.recv(timeout=5), c.recv(timeout=5)]
                assert got == [b"one", b"two"], got
            print("ring round trip ok")
        """)
        out = run([str(venv / "bin" / "python"), "-c", client], cwd=work)
        landlock = broker.status()["confinement"]["landlock"]  # type: ignore[index]
        if landlock["state"] != "enforced" or not landlock["verified"]:
            raise StepFailed(f"Landlock not in force: {landlock}")
        return f"{out.stdout.strip()}; Landlock ABI {landlock['abi']}, {landlock['rules']} rules, reading / denied"
    except StepFailed as exc:
        raise StepFailed(f"{exc}\nbroker log:\n{broker.log.read_text()}") from None
    finally:
        broker.stop()


def step_bench(venv: Path, work: Path) -> str:
    out = run([str(venv / "bin" / "shmbroker"), "bench", "--quick", "--peers", "shmbroker,pipe"], cwd=work)
    rows = [line for line in out.stdout.splitlines() if re.match(r"shmbroker\s+[0-9.]+[kMG]?\s", line)]
    if not rows:
        raise StepFailed(f"no shmbroker figures in the bench output:\n{out.stdout}\n{out.stderr}")
    figures = ", ".join(" ".join(row.split()[1:3]) for row in rows)
    return f"shmbroker msgs/s and MB/s per size: {figures} (--quick: indicative only)"


def step_metadata(venv: Path, work: Path) -> str:
    """What pip recorded and installed: the license, the URLs, the docs the
    unit's Documentation= names (under this prefix instead of /usr)."""
    probe = (
        "import importlib.metadata as m, json; d = m.metadata('shmbroker'); "
        "print(json.dumps({'license': d.get('License-Expression'), 'urls': d.get_all('Project-URL'), "
        "'classifiers': len(d.get_all('Classifier'))}))"
    )
    meta = json.loads(run([str(venv / "bin" / "python"), "-c", probe], cwd=work).stdout)
    docs = venv / "share" / "doc" / "shmbroker"
    missing = [name for name in ("hardening.md", "security.md", "LICENSE", "README.md") if not (docs / name).is_file()]
    if meta["license"] != "MIT" or not meta["urls"] or missing:
        raise StepFailed(f"metadata {meta}, missing docs {missing}")
    return f"License-Expression {meta['license']}, {len(meta['urls'])} project URLs, {meta['classifiers']} classifiers, docs in {docs}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter to install for (default: this one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shmb-smoke-"))
    work.chmod(0o755)  # the cross-uid client runs as nobody
    print(f"smoke: {args.python} in {work}")
    failed = False
    try:
        venv = install(args.python, work)
        version = run([str(venv / "bin" / "python"), "-c", "import sys, shmbroker; print(sys.version.split()[0], shmbroker.__file__)"], cwd=work)
        print(f"  installed: Python {version.stdout.strip()}")
        for name, fn in (("metadata", step_metadata), ("demo", step_demo), ("cross-uid attach", step_cross_uid),
                         ("ring with --landlock on", step_ring), ("bench", step_bench)):
            try:
                print(f"  {name}: {fn(venv, work)}")
            except (StepFailed, subprocess.TimeoutExpired) as exc:
                failed = True
                print(f"  {name}: FAILED\n{textwrap.indent(str(exc), '    ')}")
    except (StepFailed, subprocess.TimeoutExpired) as exc:
        print(f"smoke: installing failed:\n{exc}")
        failed = True
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("smoke: FAILED" if failed else "smoke: OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
