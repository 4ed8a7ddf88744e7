# Two entry points: `make demo` (the main job) and `make test` (the suite). Both set up .venv first.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BASE_STAMP := $(VENV)/.installed-base

.PHONY: demo test bench lint clean

# The demo needs only the package; the tests also need the optional extras (captum, lucent, playwright,
# Keras, Ray), which take minutes to install, so `make demo` on a fresh machine does not wait for them.
$(BASE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch and torchvision first, pinned to the releases this kind of machine serves from disk.
	# (grep drops pip's "Location ... is ignored" notes about this machine's local indexes)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	$(PY) -m pip install -q -e . 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	touch $(BASE_STAMP)

$(STAMP): $(BASE_STAMP)
	$(PY) -m pip install -q -e '.[test,bench,keras,ray]' 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	touch $(STAMP)

demo: $(BASE_STAMP)
	$(VENV)/bin/convscope demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs
