"""The only reader of configs/: launch candidates per kernel, as data, and
the decorators that tune or fix a kernel's config from them."""

import bisect
import functools
import json
from importlib import resources

import triton

from fused_sigxent.core.backend import interpreting

from . import _tuner

# Used when a kernel's JSON file is missing (a source tree without configs/).
FALLBACK = {
    "numel_class_bounds": [1 << 20],
    "dtype_arg": None,
    "interpreter": {"BLOCK": 1024},
    "candidates": [{"BLOCK": 2048, "num_warps": 8, "num_stages": 1}],
}
# Compile options of every candidate. FP fusion (a*b + c as one FMA, one
# rounding) is what the kernels' error bounds and instruction budgets assume;
# Triton 3.9 warns that its default turns off in 3.10, so it is asked for by
# name. A launch option in Triton 3.6 and 3.9 alike (CUDAOptions.enable_fp_fusion).
COMPILE_OPTIONS = {"enable_fp_fusion": True}


@functools.lru_cache(maxsize=None)
def load(kernel: str) -> dict:
    """configs/<kernel>.json, or `FALLBACK`; read and parsed once per process
    (callers must not modify it)."""
    try:
        text = resources.files("fused_sigxent.configs").joinpath(f"{kernel}.json").read_text()
    except (FileNotFoundError, ModuleNotFoundError):
        return FALLBACK
    return json.loads(text)


@functools.lru_cache(maxsize=None)
def _bounds(kernel: str) -> tuple[int, ...]:
    return tuple(sorted(load(kernel)["numel_class_bounds"]))


def numel_class(kernel: str, numel: int) -> int:
    """The size bucket that keys the config cache: how many of the file's
    bounds `numel` reaches. A bucket, not numel itself, so a new batch size
    does not trigger a new tuning run."""
    return bisect.bisect_right(_bounds(kernel), numel)


def candidates(kernel: str, size_class: int, elem_bytes: int) -> list[dict]:
    """The file's candidates for one numel class and element size (bytes of
    the tensor named by "dtype_arg"); a candidate without a "numel_class" or
    "elem_bytes" list applies to every class or size."""
    keep = [
        c for c in load(kernel)["candidates"]
        if size_class in c.get("numel_class", [size_class]) and elem_bytes in c.get("elem_bytes", [elem_bytes])
    ]
    return keep or load(kernel)["candidates"]


# Keys of a candidate that choose where it applies, not how it launches.
SELECTORS = ("numel_class", "elem_bytes")


def launch_options(candidate: dict) -> dict:
    """The keyword arguments a launch takes for one candidate: its
    meta-parameters (BLOCK, ...), num_warps, num_stages (1 unless given)."""
    options = {k: v for k, v in candidate.items() if k not in SELECTORS}
    return {**options, "num_stages": candidate.get("num_stages", 1), **COMPILE_OPTIONS}


def _decorator(kernel: str, timed: bool, overwrites: dict[str, str] | None = None):
    spec = load(kernel)
    if interpreting():
        # The interpreter can time nothing and has no occupancy: the file's
        # "interpreter" entry fixes the meta-parameters.
        return triton.heuristics({name: (lambda args, v=v: v) for name, v in spec["interpreter"].items()})

    def options(size_class: int, elem_bytes: int) -> list[dict]:
        return [launch_options(c) for c in candidates(kernel, size_class, elem_bytes)]

    return lambda fn: _tuner.Tuned(fn, options, timed=timed, dtype_arg=spec.get("dtype_arg"), overwrites=overwrites)


def tuned(kernel: str, overwrites: dict[str, str] | None = None):
    """Decorator: the file's candidates for the launch's numel class and
    element size, compiled, pruned by spills and occupancy, and timed on the
    first launch of each variant (kernels/_tuner.py). overwrites: {output
    pointer: input pointer} that a launch may alias (kept intact by timing)."""
    return _decorator(kernel, timed=True, overwrites=overwrites)


def fixed(kernel: str):
    """Decorator for a kernel that must not be timed (it writes its inputs in
    place) and needs no tuning: the file's first candidate for the numel
    class, compiled once per variant for its occupancy."""
    return _decorator(kernel, timed=False)
