# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: demo test test-long test-systemd smoke bench clean

# The venv itself, from $(PYTHON) (e.g. `make demo PYTHON=/usr/bin/python3.11`).
$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "shmbroker needs Python 3.11 or newer; run e.g. 'make PYTHON=python3.11 test'"; exit 1; }
	$(PYTHON) -m venv $(VENV) || \
	  { echo "could not create a venv with $(PYTHON); on Debian or Ubuntu: apt-get install python3-venv"; exit 1; }
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip

# The C extensions (the SIGBUS guard and the ring core) are built in place by
# the editable install: rebuild when their sources or the build script change.  The demo
# needs the package alone (msgpack and the extension).
$(DEMO_STAMP): $(BIN)/python pyproject.toml setup.py shmbroker/_guard.c shmbroker/_ring_native.c
	$(BIN)/python -m pip install -q --disable-pip-version-check -e .
	@touch $@

# Tests and benchmarks need their extras, in the same one install (one
# build of the extension).  python-prctl (the `prctl` extra) compiles
# against libcap: without its headers we do not even try (pip would print a
# red build error for something optional); the ctypes fallback is used.
$(STAMP): $(BIN)/python pyproject.toml setup.py shmbroker/_guard.c shmbroker/_ring_native.c
	@extras=test,bench; \
	if [ -e /usr/include/sys/capability.h ]; then extras=$$extras,prctl; \
	else echo "note: libcap-dev is not installed, so the optional python-prctl is skipped (the ctypes fallback is used)"; fi; \
	echo "$(BIN)/python -m pip install -q -e .[$$extras]"; \
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[$$extras]"
	@touch $@ $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python examples/demo.py

# mypy --strict first (its files and per-module settings are in pyproject.toml):
# a type error fails the run as a failing test does.
test: $(STAMP)
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest

test-long: $(STAMP)
	@# atheris (the `fuzz` extra) ships wheels for common platforms; without
	@# one, its coverage-guided fuzz test skips and says so.
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[fuzz]' || \
	  echo "note: atheris did not install; its fuzz test will be skipped"
	$(BIN)/python -m pytest -m long

# The shipped units under a real systemd 252 in a container (root;
# apt-get install systemd-container python3.11-venv python3-msgpack).
test-systemd: $(STAMP)
	$(BIN)/python -m pytest -m systemd -s tests/test_systemd_boot.py

# shmbroker from a wheel, outside this checkout, under $(PYTHON): demo,
# cross-uid attach, ring with Landlock on, bench (tools/smoke_installed.py).
smoke:
	$(PYTHON) tools/smoke_installed.py --python $(PYTHON)

bench: $(STAMP)
	$(BIN)/shmbroker bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .mypy_cache shmbroker/*.so
