"""What `python -m perf` runs: each sweep's module and arguments, for the default plan or the full one."""

import datetime
import os
from dataclasses import dataclass

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# The default plan on a CPU: `make perf` on a 2-core machine in about 8
# minutes (12 at most, install included). Sizes past the caches (16M
# elements, 64-128 MiB of logits) and one where per-call overheads show
# (64K); two feature sets (none, and all of them) where every one would
# double the time, each implementation x case being a fresh process.
CPU_LOSS = ["--numel", "65536,1048576,16777216", "--classes", "1024",
            "--pairs", "float32/float32,bfloat16/uint8", "--feature", "plain,both+smoothing", "--reduction", "mean"]
CPU_FOCAL = ["--numel", "65536,1048576", "--classes", "80,1024"]
CPU_LINEAR = ["--sizes", "small"]
# The default plan on a GPU: the real sizes, the two dtype pairs a training
# run uses (bf16 logits with uint8 labels; float32 throughout), C = 1000,
# every feature set.
GPU_LOSS = ["--numel", "1048576,16777216,67108864,268435456", "--classes", "1000",
            "--pairs", "bfloat16/uint8,float32/float32", "--reduction", "mean"]
GPU_FOCAL = []
GPU_LINEAR = ["--sizes", "gpu"]


@dataclass(frozen=True)
class Sweep:
    """One sweep of a plan: `python -m <module> <args>`, writing `csv` (and its page and plots beside it)."""

    name: str
    module: str
    args: tuple
    csv: str

    def command(self) -> str:
        return " ".join(["python", "-m", self.module, *self.args])


def sweeps(device_type: str, full: bool = False, quick: bool = False, device: str | None = None,
           stem: str | None = None) -> list[Sweep]:
    """The plan: the loss sweep, the focal loss sweep, then the fused linear
    and SigLIP sweep. device_type "cpu" or "cuda" chooses the sizes; `device`
    (default: device_type) is passed on. full: every sweep's own full set of
    cases; quick: their smoke tests. CSVs go to perf/results/<stem> with a
    prefix per sweep; stem defaults to <device>-<date> (GPU: its name)."""
    gpu = device_type == "cuda"
    stem = stem or f"{device_type}-{datetime.date.today()}"
    suffix = "-quick" if quick else "-full" if full else ""
    if quick or full:
        sizes = ([], [], [])
    else:
        sizes = (GPU_LOSS, GPU_FOCAL, GPU_LINEAR) if gpu else (CPU_LOSS, CPU_FOCAL, CPU_LINEAR)
    common = ["--device", device or device_type] + (["--quick"] if quick else [])
    plan = []
    for (name, module, prefix), args in zip([("loss", "perf.sweep_loss", ""), ("focal", "perf.sweep_focal", "focal-"),
                                             ("linear+siglip", "perf.linear_loss", "linear-")], sizes):
        csv = os.path.join(RESULTS, f"{prefix}{stem}{suffix}.csv")
        plan.append(Sweep(name, module, tuple(common + list(args) + ["--out", csv]), csv))
    return plan
