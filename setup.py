"""Builds shmbroker's C extensions: the SIGBUS guard (shmbroker/_guard.c)
and the ring's hot path (shmbroker/_ring_native.c).

Everything else about the package lives in pyproject.toml.  Neither is
optional: without the guard a peer truncating a posix segment kills the
client, and without the ring core the ring is slower everywhere and refused
on CPUs other than x86-64 (its pure-Python fallback relies on x86-64's
memory ordering).  So a machine without a C compiler or the Python headers
gets an error that says what to install instead of a package that imports
and then crashes.

Two extensions rather than one: the guard's code runs inside a signal
handler and must stay small and async-signal-safe, and every client loads
it; the ring core is ordinary CPython C API code only ring attachments use.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, LinkError

HINT = (
    "shmbroker needs a C compiler and the Python development headers to build its C extensions "
    "(shmbroker/_guard.c, shmbroker/_ring_native.c). On Debian or Ubuntu: apt-get install gcc python3-dev "
    "(python3.11-dev for /usr/bin/python3.11); on Fedora: dnf install gcc python3-devel."
)


def _missing() -> list[str]:
    missing = []
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    program = shlex.split(compiler)[0]
    if shutil.which(program) is None:
        missing.append(f"the C compiler {program!r} is not installed")
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        missing.append(f"Python.h is not in {include} (the Python headers are not installed)")
    return missing


class BuildGuard(build_ext):
    def run(self) -> None:
        missing = _missing()
        if missing:
            raise SystemExit("error: " + "; ".join(missing) + ".\n" + HINT)
        super().run()

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except (CCompilerError, CompileError, LinkError) as exc:
            raise SystemExit(f"error: building {ext.name} failed: {exc}\n{HINT}") from None


# The documentation, where the shipped unit's Documentation= looks for it:
# under the install prefix, /usr/share/doc/shmbroker for a distribution's
# /usr/bin/shmbroker (pip puts it under the venv's or /usr/local's prefix).
DOCS = ["README.md", "LICENSE", *sorted(glob.glob("docs/*.md")), "docs/benchmarks.png"]

setup(
    data_files=[("share/doc/shmbroker", DOCS)],
    ext_modules=[
        Extension(
            "shmbroker._guard",
            sources=["shmbroker/_guard.c"],
            extra_compile_args=["-std=gnu11", "-Wall", "-Wextra"],
        ),
        Extension(
            "shmbroker._ring_native",
            sources=["shmbroker/_ring_native.c"],
            # -O2: setuptools passes the interpreter's own CFLAGS, which may be
            # -O0 for a debug build; the copies and index checks want -O2.
            extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra"],
        ),
    ],
    cmdclass={"build_ext": BuildGuard},
)
