# The README's two commands: `make demo` (the main job) and `make test`. Both set up
# everything on a fresh machine first: a virtual environment in .venv with the pinned
# local CPU wheel of torch, mixprec in editable mode with its test extras, and the
# Debian packages that hold the real data sets (Fashion-MNIST, the King James Bible).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mixprec-installed
# Spin-waiting OpenMP threads cost milliseconds per parallel region on shared cores.
export OMP_WAIT_POLICY ?= passive
DEB_PACKAGES := dataset-fashion-mnist bible-kjv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data demo test bench exhaustive clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch would pull gigabytes of CUDA packages.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

data:
	@missing=""; for package in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$package 2>/dev/null | grep -q '^install ok installed' || \
			missing="$$missing $$package"; \
	done; \
	[ -z "$$missing" ] || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; }

setup: $(STAMP) data

# The main job: the CNN on Fashion-MNIST under fp32, fp16, bf16, fp8 and fp8-hybrid
# (quick budget), a table on the terminal and a report with plots in runs/demo.
demo: setup
	$(VENV)/bin/mixprec compare --model cnn --budget quick --out runs/demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/mixprec bench quantize --json bench-results/quantize.json

exhaustive: setup
	$(PY) benchmarks/exhaustive_rne.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis bench-results runs
