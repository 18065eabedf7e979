# make test: install (own venv, pinned CPU torch where none is present) and run the suite.
# make perf: install and run the performance sweep on whatever device is here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-gpu perf clean

install: $(STAMP)

# --system-site-packages: a machine that already has torch (a GPU image with its
# CUDA build) keeps it; only a machine without torch gets the pinned CPU build,
# installed before the package so the package's loose range is already met.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test,perf]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

test-gpu: install
	$(PY) -m pytest -q -m gpu

perf: install
	$(PY) -m perf

clean:
	rm -rf $(VENV) build *.egg-info
