"""`python -m perf.gpu_check`: one lent GPU's checks and measurements, each step under a time budget, in one archive."""

import argparse
import datetime
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass

# Only the standard library at the top: --dry-run must work anywhere, and a
# step that breaks an import must not take the runner (and the archive) with it.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVE = "gpu-check.tar.gz"
DEFAULT_OUT = os.path.join(ROOT, "perf", "results", "gpu-check")
# `make gpu-check` within 8 minutes: its install (under a minute where the
# packages are there) and then the steps and the packing within 7.
TOTAL_S = 420
# A step past its budget gets SIGINT first (pytest then writes its report, a
# sweep its traceback), then SIGKILL this long after.
GRACE_S = 2
# Kept for packing and the summary: no step starts with less than this left.
RESERVE_S = 10
SIZES = "67108864,16777216,1048576"  # 64M first: a sweep cut short still has the size that matters most


@dataclass(frozen=True)
class Step:
    """One command of the check, run from the repository root with
    TRITON_INTERPRET=0, killed at `budget_s`; its output goes to <name>.log."""

    name: str
    what: str
    budget_s: int
    argv: tuple


# The loss sweeps time fused_sigxent against PyTorch eager and torch.compile;
# torch.compile of our loss (a recompile per case) is left to `make perf`.
LOSS_IMPLS = "fused_sigxent,torch_eager,torch_compile"


def steps(work: str, python: str = sys.executable) -> list[Step]:
    """The check's steps, in order, writing into the folder `work`. Sweeps get
    a time limit under their budget (their longest case and report fit in the
    rest), so they stop on their own with their results written."""

    def file(name):
        return os.path.join(work, name)

    def module(name, *args):
        return (python, "-m", name, *args)

    def loss(pairs, limit_s, out):
        return module("perf.sweep_loss", "--device", "cuda", "--numel", SIZES, "--classes", "1000", "--pairs", pairs,
                      "--reduction", "mean", "--impl", LOSS_IMPLS, "--time-limit", str(limit_s), "--out", file(out))

    return [
        Step("env", "versions, GPU, commit", 10, (python, "-c", ENV_SCRIPT)),
        Step("gpu-tests", "the gpu-marked tests, compiled kernels", 85,
             module("pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "--durations", "10",
                    "--junitxml", file("gpu-tests.xml"))),
        Step("host-overhead", "host time per call, real launches", 30,
             module("perf.host_overhead", "--device", "cuda", "--out", file("host_overhead.csv"))),
        Step("loss-bf16-uint8", "loss sweep, bf16 logits, uint8 labels, 64M/16M/1M", 60,
             loss("bfloat16/uint8", 38, "loss-bf16-uint8.csv")),
        Step("loss-float32", "loss sweep, float32 logits and labels, 64M/16M/1M", 50,
             loss("float32/float32", 30, "loss-float32.csv")),
        Step("focal", "focal loss sweep, 64M/16M/1M, C=80", 25,
             module("perf.sweep_focal", "--device", "cuda", "--numel", SIZES, "--classes", "80",
                    "--time-limit", "14", "--out", file("focal.csv"))),
        Step("linear-siglip", "fused linear (B=8192 H=4096 C=151936) and SigLIP (N=65536) against their targets",
             45, module("perf.linear_loss", "--device", "cuda", "--case", "dense,siglip",
                        "--impl", "fused_sigxent,torch_eager", "--rounds", "5", "--time-limit", "25",
                        "--out", file("linear.csv"))),
        Step("config-grid", "every forward config of the wider grid at 64M, plain/weight/pos_weight", 80,
             module("perf.config_grid", "--device", "cuda", "--time-limit", "70", "--out", file("config_grid.csv"))),
    ]


ENV_SCRIPT = """
import subprocess, torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for cmd in (["git", "log", "-1", "--format=commit %H %s"], ["git", "status", "--short"],
            ["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit,driver_version",
             "--format=csv"]):
    try:
        print(subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError) as err:
        print(" ".join(cmd[:2]), "failed:", err)
"""


def out_dir(given: str | None, environ=os.environ) -> str:
    """Where the archive goes: `given`, else $OUT where set (a lent GPU
    sends back what is there), else perf/results/gpu-check/."""
    return given or environ.get("OUT") or DEFAULT_OUT


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT to the step's process group, then SIGKILL after GRACE_S."""
    for sig, wait in ((signal.SIGINT, GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(step: Step, work: str, budget_s: float) -> dict:
    """Runs one step for at most `budget_s` seconds; its status and wall time."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_INTERPRET="0")
    start = time.monotonic()
    with open(os.path.join(work, f"{step.name}.log"), "w") as log:
        log.write("$ " + " ".join(step.argv) + "\n")
        log.flush()
        try:
            proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as err:
            return dict(status=f"could not start: {err}", wall_s=0.0)
        try:
            rc = proc.wait(timeout=budget_s)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            _stop(proc)
            status = f"killed at {budget_s:.0f} s"
    return dict(status=status, wall_s=time.monotonic() - start)


def run_all(plan: list[Step], work: str, total_s: float = TOTAL_S) -> list[dict]:
    """Every step in turn, each within its budget and what is left of
    `total_s` (less RESERVE_S); a failing step does not stop the others."""
    started = time.monotonic()
    results = []
    for step in plan:
        left = total_s - RESERVE_S - (time.monotonic() - started)
        budget = min(step.budget_s, left)
        if budget < min(step.budget_s, 5):  # too little left for the step to do anything
            result = dict(status="skipped: no time left", wall_s=0.0)
        else:
            print(f"[{time.monotonic() - started:5.0f} s] {step.name} (budget {budget:.0f} s)", flush=True)
            result = run_step(step, work, budget)
            print(f"        {result['status']}, {result['wall_s']:.0f} s", flush=True)
        results.append(dict(step=step.name, what=step.what, budget_s=step.budget_s, **result))
    return results


def _tail(path: str, n: int) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-n:]
    except OSError:
        return []


def _head(path: str, n: int) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[:n]
    except OSError:
        return []


def _grep(path: str, pattern: str, n: int = 12) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return [line for line in f.read().splitlines() if re.search(pattern, line)][-n:]
    except OSError:
        return []


def _loss_table(csv: str) -> list[str]:
    import pandas as pd

    frame = pd.read_csv(csv)
    step = frame[frame["pass"] == "fwd+bwd"]
    table = step.pivot_table(index=["numel", "case"], columns="impl", values="median_ms", aggfunc="first")
    ours = step[step["impl"] == "fused_sigxent"].set_index(["numel", "case"])["pct_copy_bw"]
    table["ours % copy bw"] = ours
    return [f"{frame[['numel', 'case']].drop_duplicates().shape[0]} cases; fwd+bwd median ms:", "",
            table.reset_index().to_markdown(index=False, floatfmt=".4g")]


def _sections(work: str, results: list[dict]) -> list[str]:
    """Each step's figures that matter, from its files; a step whose files
    cannot be read says so instead."""
    parts = {
        "env": lambda: ["```"] + _head(os.path.join(work, "env.log"), 40) + ["```"],
        "gpu-tests": lambda: _grep(os.path.join(work, "gpu-tests.log"), r"passed|failed|error|skipped", 6),
        "host-overhead": lambda: _grep(os.path.join(work, "host-overhead.log"), r"^median"),
        "loss-bf16-uint8": lambda: _loss_table(os.path.join(work, "loss-bf16-uint8.csv")),
        "loss-float32": lambda: _loss_table(os.path.join(work, "loss-float32.csv")),
        "focal": lambda: _loss_table(os.path.join(work, "focal.csv")),
        "linear-siglip": lambda: _linear_targets(os.path.join(work, "linear.csv")),
        "config-grid": lambda: _grep(os.path.join(work, "config-grid.log"), r"^tuner|time limit|candidates x", 8)
        + _best_configs(os.path.join(work, "config_grid.csv")),
    }
    lines = []
    for result in results:
        name = result["step"]
        lines += [f"## {name}: {result['status']}", ""]
        try:
            body = parts[name]() if name in parts else []
        except Exception as err:  # a partial or missing file: the log says why
            body = [f"(no figures: {type(err).__name__}: {err})"]
        if result["status"] != "ok" or not body:
            body = body + ["", "Last lines of the log:", "", "```"] + _tail(os.path.join(work, f"{name}.log"), 15) + ["```"]
        lines += body + [""]
    return lines


def _linear_targets(csv: str) -> list[str]:
    import pandas as pd

    from perf import linear_loss

    frame = pd.read_csv(csv)
    return linear_loss.targets_markdown(frame)[2:] or ["(no GPU-size rows)"]


def _best_configs(csv: str) -> list[str]:
    import pandas as pd

    frame = pd.read_csv(csv)
    ok = frame[(frame["status"] == "ok") & (frame["source"] == "grid")]
    best = ok.loc[ok.groupby("feature")["median_ms"].idxmin()]
    return ["", f"{len(ok)} of {len(frame[frame['source'] == 'grid'])} grid measurements ok; fastest per feature:", "",
            best[["feature", "BLOCK", "num_warps", "num_stages", "median_ms", "pct_copy_bw", "n_regs", "occupancy"]]
            .to_markdown(index=False, floatfmt=".4g")]


def summary(work: str, results: list[dict], total_wall_s: float) -> str:
    lines = [f"# GPU check, {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             f"Wall time {total_wall_s:.0f} s (limit {TOTAL_S} s). Each step's log, CSVs and pages are in this "
             "archive; `env.log` has the versions, the GPU and the commit.", "",
             "| step | status | wall s | budget s | what |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['step']} | {r['status']} | {r['wall_s']:.0f} | {r['budget_s']} | {r['what']} |" for r in results]
    return "\n".join(lines + [""] + _sections(work, results)) + "\n"


def pack(work: str, out: str) -> str:
    """<out>/gpu-check.tar.gz holding the folder `work` as gpu-check/."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, ARCHIVE)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(work, arcname="gpu-check")
    return path


def select(plan: list[Step], only: str | None, parser) -> list[Step]:
    """The steps named in `only` (comma-separated), or all."""
    if not only:
        return plan
    names = only.split(",")
    unknown = set(names) - {s.name for s in plan}
    if unknown:
        parser.error(f"unknown step(s) {sorted(unknown)}: {', '.join(s.name for s in plan)}")
    return [s for s in plan if s.name in names]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help=f"folder for {ARCHIVE} (default: $OUT if set, else "
                        "perf/results/gpu-check/)")
    parser.add_argument("--only", default=None, help="comma-separated step names: run these alone")
    parser.add_argument("--dry-run", action="store_true", help="list the steps, their commands and budgets; run nothing")
    args = parser.parse_args(argv)
    out = out_dir(args.out)
    # A dry run names the folder the steps would write to, and makes nothing.
    work = os.path.join(tempfile.gettempdir(), "gpu-check-WORK") if args.dry_run else tempfile.mkdtemp(prefix="gpu-check-")
    plan = select(steps(work), args.only, parser)
    if args.dry_run:
        for s in plan:
            command = "python -c <versions, GPU, commit>" if s.name == "env" else " ".join(s.argv)
            print(f"{s.name} [{s.budget_s} s]: {s.what}\n    {command}")
        print(f"total budget {sum(s.budget_s for s in plan)} s of {TOTAL_S} s; archive {os.path.join(out, ARCHIVE)}")
        return 0
    started = time.monotonic()
    results = run_all(plan, work)
    text = summary(work, results, time.monotonic() - started)
    with open(os.path.join(work, "summary.md"), "w") as f:
        f.write(text)
    path = pack(work, out)
    print(text)
    print(f"packed {path}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
