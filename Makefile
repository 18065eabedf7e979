# make test: install (own venv, pinned CPU torch where none is present) and run the suite.
# make perf: install and run the performance sweep on whatever device is here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-gpu perf clean

install: $(STAMP)

# --system-site-packages: a machine that already has a torch the package accepts
# (>= 2.6: a GPU image with its CUDA build) keeps it; any other gets the pinned
# CPU build, installed before the package so its loose range is already met and
# never pulls a CUDA build.
HAS_TORCH := import sys, torch; sys.exit(tuple(map(int, torch.__version__.split(".")[:2])) < (2, 6))

$(STAMP): pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c '$(HAS_TORCH)' 2>/dev/null || $(PY) -m pip install torch==2.13.0
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
