"""The only reader of configs/: autotune candidates per kernel, as data."""

import json
from importlib import resources

import triton

from fused_sigxent._backend import interpreting

# Used when a kernel's JSON file is missing (a source tree without configs/).
FALLBACK = {
    "numel_class_bounds": [1 << 20],
    "interpreter": {"BLOCK": 1024},
    "candidates": [{"BLOCK": 2048, "num_warps": 8, "num_stages": 1, "numel_class": [0, 1]}],
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


def tuned(kernel: str):
    """Decorator: `triton.autotune` over the file's candidates for the launch's
    numel class (the autotuner adds the pointer dtypes to the key itself). The
    interpreter cannot time anything, so there it fixes the meta-parameters to
    the file's "interpreter" entry."""
    spec = load(kernel)
    if interpreting():
        return triton.heuristics({name: (lambda args, v=v: v) for name, v in spec["interpreter"].items()})
    configs, classes = [], {}
    for c in spec["candidates"]:
        config = triton.Config({"BLOCK": c["BLOCK"]}, num_warps=c["num_warps"], num_stages=c.get("num_stages", 1))
        configs.append(config)
        classes[id(config)] = set(c["numel_class"])

    def prune(configs, named_args, **kwargs):
        keep = [c for c in configs if named_args["numel_class"] in classes[id(c)]]
        return keep or configs

    return triton.autotune(
        configs, key=["numel_class"], prune_configs_by={"early_config_prune": prune},
        restore_value=spec.get("restore_value", []),
    )
