# Two entry points: `make demo` (tiny model end to end on CPU) and `make test`.
# Both create or reuse a local virtualenv in .venv and install the pinned set from
# constraints.txt (torch 2.13.0 CPU build first, so nothing pulls a CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo install clean bench

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test,tensorboard]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=40 -o faulthandler_timeout=900 tests

demo: $(STAMP)
	$(PY) -m mcore_align.demo --out demo_out $(if $(VERBOSE),--verbose)

clean:
	rm -rf demo_out runs .pytest_cache
