# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-long test-systemd bench clean

# The C extension (the SIGBUS guard) is built in place by the editable
# install: rebuild when its source or the build script changes.
$(STAMP): pyproject.toml setup.py shmbroker/_guard.c
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "shmbroker needs Python 3.11 or newer; run e.g. 'make PYTHON=python3.11 test'"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	@# python-prctl compiles against libcap; on machines without libcap-dev we
	@# keep going with the ctypes fallback instead of failing the whole setup.
	@# shmbroker's own C extension is not optional: if it cannot build, the
	@# second attempt fails too, with a message that says what to install.
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,bench,prctl]' || { \
	  echo "note: installing with python-prctl failed (it needs apt-get install libcap-dev); retrying without it, using the ctypes fallback"; \
	  $(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,bench]'; }
	@touch $@

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
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

bench: $(STAMP)
	$(BIN)/shmbroker bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis shmbroker/*.so
