# The README's two commands: `make demo` (the main job) and `make test`. Both set up
# everything on a fresh machine first: a virtual environment in .venv with the pinned
# local CPU wheel of torch, and mixprec in editable mode with its test extras.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mixprec-installed
# Spin-waiting OpenMP threads cost milliseconds per parallel region on shared cores.
export OMP_WAIT_POLICY ?= passive

.PHONY: setup demo test bench exhaustive clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch would pull gigabytes of CUDA packages.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/mixprec bench quantize

test: setup
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/mixprec bench quantize --json bench-results/quantize.json

exhaustive: setup
	$(PY) benchmarks/exhaustive_rne.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis bench-results
