"""What `python -m perf` runs: each sweep's module and arguments, for the default plan or the full one."""

import datetime
import os
from dataclasses import dataclass

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# The default plan on a CPU: `make perf` on a 2-core machine in about 6
# minutes (12 at most, install included). The loss at one size past a small
# server's caches (4M elements: 16 MiB of float32 logits, 8 of bf16) in both
# dtype pairs, with no feature and with all of them, each implementation x
# case a fresh process of its own (its peak memory, about 15 s each here);
# the focal loss at two sizes, one class count; the linear and SigLIP sweep's
# small cases. Each sweep times its passes for a bounded time (--sample-ms)
# and starts no case past its time limit, so a loaded machine still
# finishes: the summary page says how many cases ran. The other sizes wait
# for `make perf-full`.
CPU_LOSS = ["--numel", "4194304", "--classes", "1024", "--pairs", "float32/float32,bfloat16/uint8",
            "--feature", "plain,both+smoothing", "--reduction", "mean",
            "--impl", "fused_sigxent,torch_eager,torch_compile", "--sample-ms", "300", "--time-limit", "240"]
CPU_FOCAL = ["--numel", "65536,1048576", "--classes", "80", "--sample-ms", "300", "--time-limit", "60"]
CPU_LINEAR = ["--sizes", "small", "--case", "dense,siglip,sparse", "--time-limit", "90"]
# The default plan on a GPU: the real sizes, the two dtype pairs a training
# run uses (bf16 logits with uint8 labels; float32 throughout), C = 1000,
# every feature set.
GPU_LOSS = ["--numel", "1048576,16777216,67108864,268435456", "--classes", "1000",
            "--pairs", "bfloat16/uint8,float32/float32", "--reduction", "mean"]
GPU_FOCAL = []
GPU_LINEAR = ["--sizes", "gpu"]
# The distributed sweeps: gloo ranks of this machine's CPU on any machine,
# at small sizes in the default plan, their quoted sizes in the full one.
DISTRIBUTED = [("siglip-ranks", "perf.siglip_dist", "siglip_dist-"),
               ("class-parallel", "perf.class_parallel", "class_parallel-")]


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
    """The plan: the loss sweep, the focal loss sweep, the fused linear and
    SigLIP sweep, then the distributed ones (SigLIP over ranks, the
    class-parallel head). device_type "cpu" or "cuda" chooses the sizes; `device`
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
    for name, module, prefix in DISTRIBUTED:
        # (The full plan's sizes are the ones docs/ quote: those files keep the plain name.)
        csv = os.path.join(RESULTS, f"{prefix}cpu-{datetime.date.today()}{'' if full else '-small'}.csv")
        plan.append(Sweep(name, module, tuple([] if full else ["--quick"]) + ("--out", csv), csv))
    return plan
