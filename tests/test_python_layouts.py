"""The broker under every Python layout we can build here, Landlock on (issue 15).

Debian's /usr/bin/python3.11 builds ``select`` (and others) into the
interpreter, so the old ``select.__file__`` lookup crashed ``serve`` before
it served anyone; a zipapp imports from an archive file, which the old
allowlist dropped for not being a directory.  For each layout:

* a broker started with ``--landlock on`` serves a raw attach and a ring
  round trip to a client of the same interpreter, and reports Landlock
  enforced;
* a process that applies the broker's sandbox can still import, *after*
  restricting, modules it had not loaded before from each of its import
  roots (the package, msgpack, pure and extension stdlib modules), and
  cannot read /etc/hostname.

The installed copy is the package tree as a wheel lays it out, copied from
this checkout (with its built C extension), so no network is needed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipapp
from pathlib import Path
from typing import Any

import pytest

import msgpack
import shmbroker
from helpers import BrokerProc
from shmbroker import ShmClient
from shmbroker._sys import landlock

pytestmark = pytest.mark.skipif(landlock.abi_version() <= 0, reason="kernel without Landlock")

DEBIAN_PYTHON = "/usr/bin/python3.11"
PACKAGE = Path(shmbroker.__file__).resolve().parent
BASE_PYTHON = os.path.join(sys.base_prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}")


@dataclasses.dataclass
class Layout:
    name: str
    python: str
    env: dict[str, str]
    broker: list[str]  # how to run the CLI: [python, -m, shmbroker] or [python, app.pyz]
    roots: list[str]  # import roots the allowlist must name (resolved)


def _install(site: Path, *, with_msgpack: bool) -> None:
    """Lay out the package as pip would from a wheel (no tests, no caches)."""
    site.mkdir(parents=True, exist_ok=True)
    shutil.copytree(PACKAGE, site / "shmbroker", ignore=shutil.ignore_patterns("__pycache__"))
    if with_msgpack:
        shutil.copytree(Path(msgpack.__file__).parent, site / "msgpack", ignore=shutil.ignore_patterns("__pycache__"))


def _has_debian_msgpack() -> bool:
    return os.access(DEBIAN_PYTHON, os.X_OK) and subprocess.run(
        [DEBIAN_PYTHON, "-s", "-c", "import msgpack"], capture_output=True,
    ).returncode == 0


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "SHMBROKER_", "VIRTUAL_ENV"))}
    env.update(extra)
    return env


def make_layout(name: str, tmp: Path) -> Layout:
    if name.startswith("debian") and not _has_debian_msgpack():
        pytest.skip(f"needs {DEBIAN_PYTHON} with python3-msgpack (apt-get install python3.11 python3-msgpack python3.11-venv)")
    if name == "debian-system":
        # /usr/bin/python3.11 itself: the stdlib in /usr/lib/python3.11,
        # select built in, msgpack from Debian's dist-packages.
        site = tmp / "site"
        _install(site, with_msgpack=False)
        return Layout(name, DEBIAN_PYTHON, _clean_env(PYTHONPATH=str(site)), [DEBIAN_PYTHON, "-m", "shmbroker"],
                      ["/usr/lib/python3.11", "/usr/lib/python3/dist-packages", str(site)])
    if name == "debian-venv":
        venv = tmp / "venv"
        subprocess.run([DEBIAN_PYTHON, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
        site = venv / "lib" / "python3.11" / "site-packages"
        _install(site, with_msgpack=False)
        python = str(venv / "bin" / "python")
        return Layout(name, python, _clean_env(), [python, "-m", "shmbroker"],
                      ["/usr/lib/python3.11", "/usr/lib/python3/dist-packages", str(site)])
    if name == "pyenv-base":
        # The interpreter this suite's venv was made from, without the venv.
        if os.path.realpath(BASE_PYTHON) == os.path.realpath(DEBIAN_PYTHON) or not os.access(BASE_PYTHON, os.X_OK):
            pytest.skip("the base interpreter is Debian's, covered by debian-system")
        site = tmp / "site"
        _install(site, with_msgpack=True)
        return Layout(name, BASE_PYTHON, _clean_env(PYTHONPATH=str(site)), [BASE_PYTHON, "-s", "-m", "shmbroker"],
                      [os.path.realpath(os.path.join(sys.base_prefix, "lib", "python3.11")), str(site)])
    if name == "zipapp":
        # `python -m zipapp`: the package and msgpack in one archive.  The C
        # extensions in it cannot load from there (msgpack falls back to its
        # pure-Python code; the broker never needs shmbroker's guard).
        source = tmp / "zipsrc"
        _install(source, with_msgpack=True)
        (source / "__main__.py").write_text("import sys\nfrom shmbroker.cli import main\nsys.exit(main())\n")
        archive = tmp / "shmbroker.pyz"
        zipapp.create_archive(source, archive)
        shutil.rmtree(source)
        # Clients need the extension: an installed copy, same interpreter.
        site = tmp / "site"
        _install(site, with_msgpack=True)
        python = BASE_PYTHON if os.access(BASE_PYTHON, os.X_OK) else DEBIAN_PYTHON
        return Layout(name, python, _clean_env(PYTHONPATH=str(site)), [python, "-s", str(archive)], [str(archive)])
    raise AssertionError(name)


LAYOUTS = ["debian-system", "debian-venv", "pyenv-base", "zipapp"]

CLIENT = textwrap.dedent("""
    import sys
    from shmbroker import ShmClient
    path = sys.argv[1]
    with ShmClient.attach("raw", "producer", socket_path=path, size=4096) as p, \\
         ShmClient.attach("raw", "consumer", socket_path=path) as c:
        p.buf[:5] = b"hello"
        assert bytes(c.buf[:5]) == b"hello"
    with ShmClient.attach("ring", "producer", socket_path=path) as p, \\
         ShmClient.attach("ring", "consumer", socket_path=path) as c:
        p.send(b"round trip")
        assert c.recv(timeout=5) == b"round trip"
    print("ok")
""")

# Modules none of which the probe has imported before restricting: one from
# each root the broker may need later (lazy imports, tracebacks).
PROBE = textwrap.dedent("""
    import errno, json, os, sys
    from shmbroker._broker import sandbox
    from shmbroker._sys import prctl
    prctl.prctl(prctl.PR_SET_NO_NEW_PRIVS, 1)
    from shmbroker._sys import landlock
    applied = landlock.apply(sandbox.rules(socket_path=sys.argv[1], config_path=None))
    result = {"abi": applied.abi, "paths": [p for p, _ in applied.rules], "imports": {}}
    for name in ("shmbroker._bench.stats", "msgpack.fallback", "decimal", "_decimal", "csv", "email.mime.text"):
        try:
            __import__(name)
            result["imports"][name] = "ok"
        except Exception as exc:
            result["imports"][name] = f"{type(exc).__name__}: {exc}"
    try:
        open("/etc/hostname").close()
        result["etc"] = 0
    except OSError as exc:
        result["etc"] = exc.errno
    print(json.dumps(result))
""")


@pytest.fixture(params=LAYOUTS)
def layout(request: pytest.FixtureRequest, short_tmp: Path) -> Layout:
    return make_layout(request.param, short_tmp)


def test_the_broker_serves_with_landlock_on(layout: Layout, short_tmp: Path) -> None:
    sock = short_tmp / "run" / "broker.sock"
    log = short_tmp / "broker.log"
    proc = subprocess.Popen(
        [*layout.broker, "serve", "--socket", str(sock), "--landlock", "on", "-v", "--channel", "ring:1MiB:ring"],
        env=layout.env, stdout=subprocess.DEVNULL, stderr=open(log, "w"), cwd=short_tmp,
    )
    broker = BrokerProc(proc=proc, socket=str(sock), log=log)
    try:
        broker.wait_ready()
        out = subprocess.run(
            [layout.python, "-c", CLIENT, str(sock)], env=layout.env, capture_output=True, text=True, timeout=60, cwd=short_tmp,
        )
        assert out.stdout.strip() == "ok", out.stderr + log.read_text()
        restricted = next(line for line in log.read_text().splitlines() if "filesystem restricted to" in line)
        paths = {os.path.realpath(p.rsplit(" (", 1)[0]) for p in restricted.split("filesystem restricted to ", 1)[1].split(", ")}
        for root in layout.roots:
            real = os.path.realpath(root)
            assert any(real == p or real.startswith(p + "/") for p in paths), (root, sorted(paths))
        assert "/" not in paths
        landlock_status = ShmClient.status(socket_path=sock)["confinement"]["landlock"]
        assert landlock_status["state"] == "enforced" and landlock_status["verified"], landlock_status
        assert not any(p.startswith(str(PACKAGE.parent)) for p in paths), "imported this checkout, not the layout's copy"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def test_imports_after_restricting_still_work(layout: Layout, short_tmp: Path) -> None:
    env = dict(layout.env)
    if layout.name == "zipapp":
        # Import the package from the archive, as the zipapp broker does.
        env["PYTHONPATH"] = layout.roots[0]
        env["PYTHONNOUSERSITE"] = "1"
    (short_tmp / "run").mkdir()
    out = subprocess.run(
        [layout.python, "-c", PROBE, str(short_tmp / "run" / "x.sock")], env=env, capture_output=True, text=True, timeout=60,
        cwd=short_tmp,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    assert all(v == "ok" for v in result["imports"].values()), result["imports"]
    assert result["etc"] == 13  # EACCES: the sandbox is real
    if layout.name == "zipapp":
        assert layout.roots[0] in result["paths"]
        assert shmbroker.__file__ not in json.dumps(result)  # the archive's copy, not this checkout's
