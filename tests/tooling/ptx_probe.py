"""The kernels cross-compiled for sm_90 (and one sm_80 build) with no GPU, for
tests/tooling/test_ptx.py and tests/tooling/test_sass.py: `python -m perf.sass` (perf/_sass.py
holds the compile and disassembly code) run once per test session, in a
fresh process, since this one interprets the kernels (TRITON_INTERPRET=1)."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

from perf._sass import Variant

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Every autotune candidate of each (the budgets hold for all of them).
VARIANTS = [
    # the budgets: a training step's forward and the backward's recompute
    Variant("fwd", "bf16", "u8"),
    Variant("fwd", "fp32", "fp32"),
    Variant("bwd", "bf16", "u8", reduction="none"),
    Variant("bwd", "fp32", "fp32", reduction="none"),
    Variant("fwd", "bf16", "u8", "class", "class"),
    Variant("fwd", "bf16", "u8", "class", "class", classes=1031),
    # elementwise loss out (a vector store with no gradient), float64 (the
    # exact path, which spilled at 16 elements per thread), int64 offsets,
    # an A100 build, and the in-place scaling
    Variant("fwd", "bf16", "bf16", reduction="none", grads=""),
    Variant("fwd", "fp64", "fp64", "class", "class"),
    Variant("fwd", "bf16", "u8", int64=True),
    Variant("fwd", "bf16", "u8", arch=80),
    Variant("scale", "bf16", "u8"),
    # the focal loss, each with its budget: hard labels (forward
    # and backward), soft labels (bf16 and fp32), class indices
    Variant("fwd", "bf16", "u8", focal="hard"),
    Variant("bwd", "bf16", "u8", reduction="none", focal="hard"),
    Variant("fwd", "bf16", "bf16", focal="soft"),
    Variant("fwd", "fp32", "fp32", focal="soft"),
    Variant("fwd", "bf16", "index", focal="hard"),
]


@functools.lru_cache(maxsize=None)
def _run(variants: str) -> tuple[dict, ...]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "perf.sass", "--json", "--no-csv", "--variants", variants],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def rows() -> list[dict]:
    """One row per variant x candidate (perf/_sass.py analyze's columns)."""
    return list(_run(json.dumps([dataclasses.asdict(v) for v in VARIANTS])))


def rows_of(variant: Variant) -> list[dict]:
    found = [r for r in rows() if r["variant"] == variant.name]
    assert found, variant.name
    return found
