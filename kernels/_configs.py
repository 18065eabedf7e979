"""The only reader of configs/: autotune candidates per kernel, as data."""

import json
from importlib import resources

import triton

from fused_sigxent._backend import interpreting

# Used when a kernel's JSON file is missing (a source tree without configs/).
FALLBACK = {
    "numel_class_bounds": [1 << 20],
    "dtype_arg": None,
    "interpreter": {"BLOCK": 1024},
    "candidates": [{"BLOCK": 2048, "num_warps": 8, "num_stages": 1}],
}


def load(kernel: str) -> dict:
    """configs/<kernel>.json, or `FALLBACK`."""
    try:
        text = resources.files("fused_sigxent.configs").joinpath(f"{kernel}.json").read_text()
    except (FileNotFoundError, ModuleNotFoundError):
        return FALLBACK
    return json.loads(text)


def numel_class(kernel: str, numel: int) -> int:
    """The size bucket that keys the autotune cache: how many of the file's
    bounds `numel` reaches. A bucket, not numel itself, so a new batch size
    does not trigger a new tuning run."""
    return sum(numel >= bound for bound in load(kernel)["numel_class_bounds"])


def candidates(kernel: str, size_class: int, elem_bytes: int) -> list[dict]:
    """The file's candidates for one numel class and element size (bytes of
    the tensor named by "dtype_arg"); a candidate without a "numel_class" or
    "elem_bytes" list applies to every class or size."""
    keep = [
        c for c in load(kernel)["candidates"]
        if size_class in c.get("numel_class", [size_class]) and elem_bytes in c.get("elem_bytes", [elem_bytes])
    ]
    return keep or load(kernel)["candidates"]


def tuned(kernel: str):
    """Decorator: `triton.autotune` over the file's candidates for the launch's
    numel class and element size (the autotuner adds the pointer dtypes to its
    cache key itself). The interpreter cannot time anything, so there it fixes
    the meta-parameters to the file's "interpreter" entry."""
    spec = load(kernel)
    if interpreting():
        return triton.heuristics({name: (lambda args, v=v: v) for name, v in spec["interpreter"].items()})
    configs = {}
    for c in spec["candidates"]:
        key = (c["BLOCK"], c["num_warps"], c.get("num_stages", 1))
        configs[key] = triton.Config({"BLOCK": key[0]}, num_warps=key[1], num_stages=key[2])

    def prune(configs_in, named_args, **kwargs):
        arg = spec.get("dtype_arg")
        elem_bytes = named_args[arg].element_size() if arg else 0
        wanted = candidates(kernel, named_args["numel_class"], elem_bytes)
        keys = {(c["BLOCK"], c["num_warps"], c.get("num_stages", 1)) for c in wanted}
        return [config for key, config in configs.items() if key in keys]

    return triton.autotune(
        list(configs.values()), key=["numel_class"], prune_configs_by={"early_config_prune": prune},
        restore_value=spec.get("restore_value", []),
    )
