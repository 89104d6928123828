# effsr — everything a fresh machine needs goes through these targets.
# TORCH_SPEC pins the CPU build available on the CI machine; on a GPU machine use e.g.
#   make install TORCH_SPEC='torch'   (or install your CUDA torch into .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# TORCH_INDEX: the index torch alone is installed from, e.g. PyTorch's CPU wheels (CI: the default index has the
# multi-GB CUDA build on Linux):   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
STAMP := $(VENV)/.effsr-installed

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url '$(TORCH_INDEX)') '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/effsr demo

test: install
	$(PY) -m pytest -q

# the developer loop: unit + integration (+ gpu where CUDA is present); no subprocess CLI runs, no DDP
test-fast: install
	$(PY) -m pytest -q -m "not e2e and not ddp and not exhaustive"

lint: install
	$(VENV)/bin/ruff check effsr tests benchmarks

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
