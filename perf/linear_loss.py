"""`python -m perf.linear_loss`: fused linear + sigmoid CE and SigLIP against
the unfused eager composition and its torch.compile: time and peak memory per
pass, one CSV row per measurement, a markdown summary and a plot."""

import argparse
import os
import time

import pandas as pd
import torch
import torch.nn.functional as F

import fused_sigxent as fs
from fused_sigxent.impl import chunked

from . import _bench, _memory

# Case tables, chosen by --sizes (default: "gpu" on a GPU, "full" on the CPU).
# full: training heads whose logits are 1-2 GiB in float32:
#   dense:  B=8192, H=256, C=32768 float32, 1% positives as float32 labels (logits 1 GiB);
#   sparse: B=2048, H=128, C=262144, K=5 int64 positives per row (dense logits 2 GiB,
#           dense float32 labels 2 GiB; the unfused composition must build those labels);
#   siglip: N=16384, D=256 float32 (N x N logits 1 GiB).
CASES = {
    "dense": dict(kind="dense", B=8192, H=256, C=32768, K=0),
    "sparse": dict(kind="sparse", B=2048, H=128, C=262144, K=5),
    "siglip": dict(kind="siglip", B=16384, H=256, C=16384, K=0),
}
# small: `make perf` on a CPU. Logits of 64-128 MiB in float32, past any
# cache, so the unfused composition's full-size passes still cost what they
# cost at scale, while each eager step stays well under a second on 2 cores.
SMALL_CASES = {
    "dense": dict(kind="dense", B=2048, H=128, C=16384, K=0),
    "sparse": dict(kind="sparse", B=512, H=64, C=65536, K=5),
    "siglip": dict(kind="siglip", B=4096, H=128, C=4096, K=0),
}
# quick: the same shapes 1/16 to 1/64 the full size, for a smoke test.
QUICK_CASES = {
    "dense": dict(kind="dense", B=512, H=64, C=4096, K=0),
    "sparse": dict(kind="sparse", B=256, H=32, C=16384, K=5),
    "siglip": dict(kind="siglip", B=2048, H=64, C=2048, K=0),
}
# gpu: the dense head of a 152k-vocabulary model in bf16 and SigLIP at
# N = 65,536 bf16 (D = 768 assumed), the sizes of GPU_TARGETS.
GPU_CASES = {
    "dense": dict(kind="dense", B=8192, H=4096, C=151936, K=0),
    "sparse": dict(kind="sparse", B=8192, H=1024, C=262144, K=16),
    "siglip": dict(kind="siglip", B=65536, H=768, C=65536, K=0),
}
TABLES = {"full": CASES, "small": SMALL_CASES, "quick": QUICK_CASES, "gpu": GPU_CASES}
# On one H100, fused_sigxent's fwd+bwd: (median ms at most, peak bytes above
# the inputs at most). Dense: Liger's fused linear + softmax CE at this size
# takes 192 ms and 6.1 GiB; SigLIP: the figures of the siglip-kernel project.
GPU_TARGETS = {"dense": (60.0, 6 << 30), "siglip": (48.8, 1.4e9)}
IMPLS = ["fused_sigxent", "torch_eager", "torch_compile"]
PASSES = ["fwd", "fwd+bwd"]
# Goals against eager at any size, checked in the summary.
GOAL_DENSE_MEMORY_RATIO = 1 / 8  # ours / eager, fwd+bwd peak
GOAL_SPARSE_MEMORY_BYTES = 512 << 20  # ours, fwd+bwd peak above inputs
GOAL_SIGLIP_MEMORY_RATIO = 1 / 8
GOAL_SPEED_RATIO = 1.1  # ours / eager, fwd+bwd time
COLUMNS = ["device", "threads", "torch_version", "triton_version", "commit", "impl", "case", "dtype", "B", "H", "C", "K",
           "chunk_size", "pass", "median_ms", "p20_ms", "p80_ms", "min_ms", "rounds", "input_bytes",
           "peak_mem_bytes"]


def make_inputs(spec, seed=0, device="cpu", dtype=torch.float32):
    """(features, weight-like, target, extras) of a case, from a fixed seed
    (a memory child builds the same). Leaves require grad as a training step's do."""
    g = torch.Generator(device).manual_seed(seed)
    B, H, C, K = spec["B"], spec["H"], spec["C"], spec["K"]
    kw = dict(generator=g, device=device)
    x = torch.randn(B, H, **kw).to(dtype).requires_grad_()
    if spec["kind"] == "siglip":
        x = F.normalize(x.detach(), dim=-1).requires_grad_()
        y = F.normalize(torch.randn(B, H, **kw).to(dtype), dim=-1).requires_grad_()
        # open_clip's initial values: logit_scale = exp(log 10), logit_bias = -10.
        return dict(x=x, y=y, t=torch.tensor(10.0, device=device, requires_grad=True),
                    b=torch.tensor(-10.0, device=device, requires_grad=True))
    w = (torch.randn(C, H, **kw) / H ** 0.5).to(dtype).requires_grad_()
    bias = torch.zeros(C, device=device, dtype=dtype, requires_grad=True)
    if spec["kind"] == "dense":
        target = (torch.rand(B, C, **kw) < 0.01).to(dtype)
    else:
        target = torch.randint(0, C, (B, K), **kw)
        target[:, -1] = -1  # padding, as a ragged batch has
    return dict(x=x, w=w, bias=bias, target=target)


def eager_step(kind):
    """The unfused composition, as a user writes it: the logits, then PyTorch's loss.
    Sparse targets are made dense first (scatter into (B, C) float32 labels);
    SigLIP is open_clip's SigLipLoss._loss (labels 2 I - 1, -logsigmoid, / N)."""
    if kind == "siglip":
        def loss(x, y, t, b):
            logits = t * x @ y.T + b
            labels = 2 * torch.eye(x.shape[0], dtype=x.dtype, device=x.device) - 1
            return -F.logsigmoid(labels * logits).sum() / x.shape[0]
        return loss
    if kind == "sparse":
        def loss(x, w, bias, target):
            dense = torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
            dense.scatter_(1, target.clamp_min(0), (target >= 0).to(x.dtype))
            return F.binary_cross_entropy_with_logits(F.linear(x, w, bias), dense)
        return loss

    def loss(x, w, bias, target):
        return F.binary_cross_entropy_with_logits(F.linear(x, w, bias), target)
    return loss


def fused_step(kind):
    if kind == "siglip":
        return lambda x, y, t, b: fs.siglip_loss(x, y, t, b)
    return lambda x, w, bias, target: fs.linear_sigmoid_cross_entropy(x, w, target, bias)


def implementation(name, kind):
    if name == "fused_sigxent":
        return fused_step(kind)
    if name == "torch_eager":
        return eager_step(kind)
    torch._dynamo.reset()
    return torch.compile(eager_step(kind), dynamic=False)


def step_fns(fn, inputs):
    """forward() -> loss with its graph; backward(loss); reset() drops the gradients."""
    leaves = [t for t in inputs.values() if t.requires_grad]

    def forward():
        return fn(**inputs)

    def backward(loss):
        loss.backward()

    def reset():
        for t in leaves:
            t.grad = None

    return forward, backward, reset


def input_bytes(inputs) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values())


def memory_child(impl, case, sizes="full", threads=None):
    """In a fresh process (perf._memory): {pass: peak bytes above the inputs}."""
    if threads:
        torch.set_num_threads(threads)
    spec = TABLES[sizes][case]
    inputs = make_inputs(spec)
    forward, backward, reset = step_fns(implementation(impl, spec["kind"]), inputs)
    return _memory.pass_peaks(forward, backward, reset, torch.device("cpu"))


def time_rounds(fns: dict, rounds: int, dev: torch.device = torch.device("cpu")) -> dict:
    """{(impl, pass): [seconds per round]}: after one warm-up step each, the
    implementations take turns, one call each per round, so a load that
    comes and goes on a shared machine falls on all of them alike."""
    out = {}
    for name, (forward, backward, reset) in list(fns.items()):
        try:
            backward(forward())  # warm-up: compilation, first-call caches, thread pools
        except torch.OutOfMemoryError as err:  # eager's logits at GPU sizes: the others still run
            print(f"    {name}: out of memory, left out ({str(err).splitlines()[0]})", flush=True)
            del fns[name]
            torch.cuda.empty_cache()
        reset()
    for _ in range(rounds):
        for name, (forward, backward, reset) in fns.items():
            sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
            sync()
            start = time.perf_counter()
            loss = forward()
            sync()
            mid = time.perf_counter()
            backward(loss)
            sync()
            end = time.perf_counter()
            reset()
            del loss
            out.setdefault((name, "fwd"), []).append(mid - start)
            out.setdefault((name, "fwd+bwd"), []).append(end - start)
    return out


def target_checks(frame: pd.DataFrame) -> list[dict]:
    """GPU_TARGETS against fused_sigxent's fwd+bwd rows of the GPU sizes: one
    dict per case measured, with the figures and "pass" or "FAIL"."""
    checks = []
    for case, (ms_goal, bytes_goal) in GPU_TARGETS.items():
        spec = GPU_CASES[case]
        rows = frame[(frame["case"] == case) & (frame["impl"] == "fused_sigxent") & (frame["pass"] == "fwd+bwd")
                     & (frame["B"] == spec["B"]) & (frame["C"] == spec["C"]) & (frame["H"] == spec["H"])]
        if rows.empty:
            continue
        row = rows.iloc[0]
        peak = row["peak_mem_bytes"]
        ok = row["median_ms"] <= ms_goal and pd.notna(peak) and peak <= bytes_goal
        checks.append(dict(case=case, median_ms=row["median_ms"], target_ms=ms_goal,
                           peak_gib=peak / 2**30 if pd.notna(peak) else float("nan"), target_gib=bytes_goal / 2**30,
                           with_inputs_gib=(peak + row["input_bytes"]) / 2**30 if pd.notna(peak) else float("nan"),
                           verdict="pass" if ok else "FAIL"))
    return checks


def targets_markdown(frame: pd.DataFrame) -> list[str]:
    checks = target_checks(frame)
    if not checks:
        return []
    return ["", "## GPU targets (fused_sigxent, fwd+bwd)", "",
            "Peak: CUDA's allocator peak above the inputs (the step's gradients included); "
            "the inputs added in the next column.", "",
            "| case | median ms | target ms | peak GiB | target GiB | peak with inputs GiB | verdict |",
            "| --- | --- | --- | --- | --- | --- | --- |"] + [
        f"| {c['case']} | {c['median_ms']:.1f} | {c['target_ms']:g} | {c['peak_gib']:.2f} | {c['target_gib']:.2f} | "
        f"{c['with_inputs_gib']:.2f} | {c['verdict']} |" for c in checks]


def summarize(frame: pd.DataFrame, pngs=()) -> str:
    """The markdown page: per case, each implementation's fwd+bwd time and
    peaks, the ratios to eager, the goals against eager checked, and on a
    GPU the targets."""
    lines = [f"# fused linear + sigmoid CE and SigLIP on {frame['device'].iloc[0]}", "",
             f"torch {frame['torch_version'].iloc[0]}, {frame['threads'].iloc[0]} torch thread(s), "
             f"commit {frame['commit'].iloc[0]}. "
             "Times: median (min) of rounds in which the implementations took turns "
             "(perf/linear_loss.py); peaks: memory above the inputs (CPU: resident memory, a fresh process per "
             "implementation x case, perf/_memory.py; GPU: CUDA's allocator).", "",
             "| case | shape | pass | impl | median ms | min ms | peak MiB | time / eager | peak / eager |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    goals = []
    for case, part in frame.groupby("case", sort=False):
        first = part.iloc[0]
        shape = f"B={first['B']} H={first['H']} C={first['C']}" + (f" K={first['K']}" if first["K"] else "")
        for pass_ in PASSES:
            rows = part[part["pass"] == pass_].set_index("impl")
            eager = rows.loc["torch_eager"] if "torch_eager" in rows.index else None
            for impl, row in rows.iterrows():
                peak = row["peak_mem_bytes"]
                t_ratio = row["median_ms"] / eager["median_ms"] if eager is not None else float("nan")
                m_ratio = peak / eager["peak_mem_bytes"] if eager is not None and pd.notna(peak) else float("nan")
                lines.append(f"| {case} | {shape} | {pass_} | {impl} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | "
                             f"{peak / 2**20 if pd.notna(peak) else float('nan'):.0f} | {t_ratio:.2f} | {m_ratio:.3f} |")
        step = part[part["pass"] == "fwd+bwd"].set_index("impl")
        if {"fused_sigxent", "torch_eager"} <= set(step.index):
            ours, eager = step.loc["fused_sigxent"], step.loc["torch_eager"]
            speed = ours["median_ms"] / eager["median_ms"]
            speed_min = ours["min_ms"] / eager["min_ms"]
            goals.append(f"- {case}: fwd+bwd time ours / eager = {speed:.2f} (median), {speed_min:.2f} (min); "
                         f"goal <= {GOAL_SPEED_RATIO}: {'met' if max(speed, speed_min) <= GOAL_SPEED_RATIO else 'NOT met'}")
            peak, eager_peak = ours["peak_mem_bytes"], eager["peak_mem_bytes"]
            if pd.notna(peak) and pd.notna(eager_peak):
                if case == "sparse":
                    goals.append(f"- sparse: ours {peak / 2**20:.0f} MiB above inputs (eager {eager_peak / 2**20:.0f} MiB); "
                                 f"goal <= 512 MiB: {'met' if peak <= GOAL_SPARSE_MEMORY_BYTES else 'NOT met'}")
                else:
                    goal = GOAL_DENSE_MEMORY_RATIO if case == "dense" else GOAL_SIGLIP_MEMORY_RATIO
                    goals.append(f"- {case}: peak ours / eager = {peak / eager_peak:.3f} ({peak / 2**20:.0f} vs "
                                 f"{eager_peak / 2**20:.0f} MiB); goal <= 1/8: {'met' if peak / eager_peak <= goal else 'NOT met'}")
    note = [] if not frame["device"].iloc[0].startswith("cpu") else [
        "", "On a 2-core machine shared with other jobs, run with `--threads 1`: with two threads, "
        "every parallel op waits at OpenMP's barrier for a descheduled thread, which punishes many small "
        "ops far more than a few big ones."]
    plots = ["", "## Plot", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs] if pngs else []
    return "\n".join(lines + note + targets_markdown(frame) + [
        "", "## Goals against eager", "", "Met only if both the median and the min ratio meet it. The memory goals are "
        "for the full sizes (`--sizes full` or `gpu`): at smaller ones a chunk is a larger share of the logits.", ""]
        + goals + plots) + "\n"


def plot(frame: pd.DataFrame, stem: str) -> list[str]:
    """<stem>.png: fwd+bwd median time and peak memory per case, a bar per
    implementation (log scale). Needs matplotlib (the perf extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    step = frame[frame["pass"] == "fwd+bwd"]
    if step.empty:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    panels = [("median_ms", "fwd+bwd median ms", 1.0), ("peak_mem_bytes", "fwd+bwd peak MiB above the inputs", 2**20)]
    for ax, (column, label, unit) in zip(axes, panels):
        table = step.pivot_table(index="case", columns="impl", values=column, aggfunc="first", sort=False)
        table = table.astype(float) / unit
        if table.notna().any().any():
            table.plot.bar(ax=ax, logy=True, rot=0)
        ax.set_ylabel(label)
        ax.set_xlabel("")
    fig.suptitle(f"fused linear + sigmoid CE and SigLIP, {frame['device'].iloc[0]}, {frame['dtype'].iloc[0]}")
    fig.tight_layout()
    path = f"{stem}.png"
    fig.savefig(path)
    plt.close(fig)
    return [path]


def write(rows, out, final=False) -> list[str]:
    """The CSV (rewritten after every case); with `final`, the summary and the plot."""
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["peak_mem_bytes"] = frame["peak_mem_bytes"].astype("Int64")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    frame.to_csv(out, index=False)
    if not final or frame.empty:
        return [out]
    stem = os.path.splitext(out)[0]
    pngs = plot(frame, stem)
    with open(stem + ".md", "w") as f:
        f.write(summarize(frame, pngs))
    return [out, stem + ".md"] + pngs


def parser():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="--sizes quick")
    parser.add_argument("--sizes", choices=sorted(TABLES), default=None,
                        help="case table (default: gpu on a GPU, full on the CPU)")
    parser.add_argument("--case", default=None, help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument("--impl", default=None, help=f"comma-separated: {', '.join(IMPLS)}")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per case (default 3)")
    parser.add_argument("--no-memory", action="store_true", help="leave peak_mem_bytes empty")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bfloat16; peaks from CUDA's allocator)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own, "
                        "the cores); memory children use the same")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds: start no case after this long")
    parser.add_argument("--out", default=None, help="CSV path (default perf/results/linear-<device>-<date>.csv)")
    parser.add_argument("--dry-run", action="store_true", help="list the cases and exit")
    return parser


def _plan(args):
    """(table name, [case names], [impl names]) of parsed arguments."""
    sizes = "quick" if args.quick else args.sizes or ("gpu" if args.device.startswith("cuda") else "full")
    cases = args.case.split(",") if args.case else list(TABLES[sizes])
    return sizes, cases, args.impl.split(",") if args.impl else IMPLS


def planned(argv) -> list[str]:
    """The cases `main(argv)` would run, one line each (nothing is timed)."""
    sizes, cases, impls = _plan(parser().parse_args(argv))
    return [f"{case} " + " ".join(f"{k}={v}" for k, v in TABLES[sizes][case].items() if k != "kind")
            for case in cases]


def main(argv=None):
    started = time.perf_counter()
    args = parser().parse_args(argv)
    if args.dry_run:
        print("\n".join(planned(argv)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    env = _bench.environment(dev)
    print(f"{'GPU run' if gpu else 'CPU-only run (no GPU)'}: {env['device']}, {torch.get_num_threads()} torch threads; "
          "fused linear + sigmoid CE / SigLIP against the unfused eager composition and its torch.compile", flush=True)
    sizes, cases, impls = _plan(args)
    memory = not args.no_memory and (gpu or _memory.rss_available())
    out = args.out or _bench.results_csv("linear-", dev, "-quick" if args.quick else "")
    rows, stopped = [], None
    for k, case in enumerate(cases):
        if args.time_limit is not None and time.perf_counter() - started > args.time_limit:
            stopped = f"{k} of {len(cases)} cases: time limit ({args.time_limit:.0f} s) reached"
            print(stopped, flush=True)
            break
        spec = TABLES[sizes][case]
        inputs = make_inputs(spec, device=dev, dtype=dtype)
        fns = {name: step_fns(implementation(name, spec["kind"]), inputs) for name in impls}
        print(f"{case}: {spec}", flush=True)
        timed = time_rounds(fns, args.rounds, dev)
        peaks = {}
        if memory and gpu:
            for name, fn in fns.items():
                try:
                    peaks[name] = _memory.pass_peaks(*fn, dev)
                except torch.OutOfMemoryError:
                    print(f"    {name}: out of memory measuring its peak", flush=True)
                    torch.cuda.empty_cache()
        elif memory:
            specs = [dict(impl=name, case=case, sizes=sizes, threads=torch.get_num_threads()) for name in fns]
            # One child at a time at full size, where eager's peaks are several GiB each.
            peaks = dict(zip(fns, _memory.run_children("linear_loss", specs, workers=1 if sizes == "full" else 2)))
        chunk = chunked.chunk_rows(spec["B"], spec["C"], dev)
        for (name, pass_), seconds in timed.items():
            ms = torch.tensor(seconds, dtype=torch.float64) * 1e3
            q = ms.quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
            rows.append(dict(env, threads=torch.get_num_threads(), impl=name, case=case,
                             dtype=str(dtype).replace("torch.", ""), B=spec["B"], H=spec["H"], C=spec["C"],
                             K=spec["K"], chunk_size=chunk if name == "fused_sigxent" else None,
                             **{"pass": pass_}, median_ms=q[0], p20_ms=q[1], p80_ms=q[2], min_ms=ms.min().item(),
                             rounds=len(seconds), input_bytes=input_bytes(inputs),
                             peak_mem_bytes=peaks.get(name, {}).get(pass_)))
            print(f"    {name:15} {pass_:8} median {q[0]:9.1f} ms  min {ms.min().item():9.1f} ms  "
                  f"peak {rows[-1]['peak_mem_bytes']}", flush=True)
        del inputs, fns
        write(rows, out)
    paths = write(rows, out, final=True)
    for line in targets_markdown(pd.DataFrame(rows, columns=COLUMNS)):
        print(line)
    print(f"wrote {', '.join(paths)}")
    print(f"sweep took {time.perf_counter() - started:.0f} s")
    return stopped


if __name__ == "__main__":
    main()
