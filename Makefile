# make test: install (own venv, pinned CPU torch where none is present) and run the suite.
# make perf: install and run the performance sweeps on whatever device is here,
#   at sizes that mean something there (a 2-core CPU: about 8 minutes).
# make perf-full: every sweep's full set of cases (a 2-core CPU: over half an hour).
# make perf-plan: what make perf would run, case by case; nothing is timed.
# make gpu-check: one GPU's checks and measurements within 8 minutes, in one
#   archive ($(OUT) where set, else perf/results/gpu-check/).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-gpu perf perf-full perf-plan gpu-check clean

install: $(STAMP)

# The venv sees every package $(PYTHON) sees: a .pth file lists $(PYTHON)'s
# sys.path (its venv or conda env, and the system site-packages that one
# sees). `venv --system-site-packages` is not enough: from inside a venv it
# exposes the base interpreter's packages, not the venv's, so a GPU box's
# CUDA torch would be missed and a CPU torch installed beside it. Packages
# installed here shadow the parent's and never change it. Only plain path
# entries are copied, so an editable install of this project in the parent
# (an import hook, not a path) does not shadow this checkout.
#
# Torch: a torch >= 2.6 that is there (a GPU image's CUDA build) is used as
# it is; otherwise the pinned CPU build is installed first, so the package's
# loose range is already met and never pulls a CUDA build.
#
# Offline where the dependencies are present: --no-build-isolation builds
# with the setuptools that is there (>= 70.1 builds editable wheels without
# `wheel`), and pip finds every requirement satisfied. Where an extra is
# missing and cannot be fetched (a GPU image has no `expecttest`), the
# package goes in alone and the tests run with what is there.
#
# Triton 3.6's interpreter breaks with numpy >= 2.4 (fixed in 3.7): with an
# older triton, numpy < 2.4 is installed here (shadowing, never replacing, the
# parent's). Where that cannot be installed (no network), `make test` skips
# the interpreted phase and says so, and runs the GPU phase only.
HAS_TORCH := import sys, torch; sys.exit(tuple(map(int, torch.__version__.split(".")[:2])) < (2, 6))
HAS_SETUPTOOLS := import sys, setuptools; sys.exit(tuple(map(int, setuptools.__version__.split(".")[:2])) < (70, 1))
PARENT_PATH := import os, sys, sysconfig; std = {sysconfig.get_path(k) for k in ("stdlib", "platstdlib")}; print("\n".join(p for p in sys.path if p and os.path.isdir(p) and p not in std and not p.endswith("lib-dynload")))
CAN_INTERPRET := import sys, numpy, triton; v = lambda m: tuple(map(int, m.__version__.split(".")[:2])); sys.exit(v(triton) < (3, 7) and v(numpy) >= (2, 4))
HAS_CUDA := import sys, torch; sys.exit(not torch.cuda.is_available())

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv --without-pip $(VENV)
	$(PYTHON) -c '$(PARENT_PATH)' > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_parent_env.pth"
	$(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip --default-pip
	$(PY) -c '$(HAS_TORCH)' 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -c '$(HAS_SETUPTOOLS)' 2>/dev/null || $(PY) -m pip install "setuptools>=70.1"
	$(PY) -m pip install --no-build-isolation -e ".[test,perf]" || { \
		echo "an extra of .[test,perf] is not installable here (offline?): the package alone, with what is here"; \
		$(PY) -m pip install --no-build-isolation --no-deps -e .; }
	$(PY) -c '$(CAN_INTERPRET)' || $(PY) -m pip install "numpy<2.4" || echo "numpy<2.4 not installable here: make test skips the interpreted phase"
	touch $(STAMP)

# The suite interprets the kernels on CPU tensors; where a GPU is present the
# gpu-marked tests then run again with compiled kernels (TRITON_INTERPRET=0).
# Two pytest workers where pytest-xdist is installed: most tests are the
# interpreter's Python, one core each, so two cores halve the wall time.
HAS_XDIST := import xdist
test: install
	@if $(PY) -c '$(CAN_INTERPRET)'; then \
		if $(PY) -c '$(HAS_XDIST)' 2>/dev/null; then $(PY) -m pytest -q -n 2; else $(PY) -m pytest -q; fi; \
	elif $(PY) -c '$(HAS_CUDA)'; then \
		echo "SKIPPED the interpreted phase: triton < 3.7 with numpy >= 2.4 (numpy < 2.4 could not be installed)"; \
	else \
		echo "triton < 3.7 needs numpy < 2.4 to interpret the kernels, and there is no GPU: nothing can test them"; exit 1; \
	fi
	@if $(PY) -c '$(HAS_CUDA)'; then $(MAKE) test-gpu; fi

test-gpu: install
	TRITON_INTERPRET=0 $(PY) -m pytest -q -m gpu

perf: install
	$(PY) -m perf

perf-full: install
	$(PY) -m perf --full

perf-plan: install
	$(PY) -m perf --dry-run

gpu-check: install
	$(PY) -m perf.gpu_check

clean:
	rm -rf $(VENV) build *.egg-info
