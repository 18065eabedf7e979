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

# The suite interprets the kernels on CPU tensors; where a GPU is present the
# gpu-marked tests then run again with compiled kernels (TRITON_INTERPRET=0).
test: install
	$(PY) -m pytest -q
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then $(MAKE) test-gpu; fi

test-gpu: install
	TRITON_INTERPRET=0 $(PY) -m pytest -q -m gpu

perf: install
	$(PY) -m perf

clean:
	rm -rf $(VENV) build *.egg-info
