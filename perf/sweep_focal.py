"""The focal loss sweep: fused_sigxent's sigmoid_focal_loss against torchvision's
formula in eager PyTorch and under torch.compile, one CSV row per measurement
(the loss sweep's columns), a short markdown summary and plots."""

import argparse
import functools
import os
import time

import pandas as pd
import torch
import torch.nn.functional as F

import fused_sigxent as fs

from . import _bench, _memory, report

# Sizes: numel x classes, shaped (numel // C, C); C = 80 (COCO's classes, a
# RetinaNet head's width) and 1024. GPU: 1M..64M elements. CPU (2 cores, the
# whole sweep in a few minutes): 64K (per-call overheads) and 256K.
GPU_NUMELS = [1 << 20, 1 << 24, 1 << 26]
CPU_NUMELS = [1 << 16, 1 << 18]
CLASSES = [80, 1024]
# (logits dtype, labels): soft float32 targets, and bf16 logits with uint8
# hard targets (torchvision's formula takes them cast to the logits dtype).
DTYPE_LABELS = [(torch.float32, torch.float32), (torch.bfloat16, torch.uint8)]
GAMMA, ALPHA = 2.0, 0.25  # torchvision's defaults
REDUCTIONS = ["mean"]
IMPLS = ["fused_sigxent", "torchvision_eager", "torchvision_compile"]


def torchvision_loss(x, z, reduction):
    """torchvision.ops.sigmoid_focal_loss's body (v0.20), verbatim but for the target cast."""
    targets = z.to(x.dtype)
    p = torch.sigmoid(x)
    ce_loss = F.binary_cross_entropy_with_logits(x, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** GAMMA)
    alpha_t = ALPHA * targets + (1 - ALPHA) * (1 - targets)
    loss = alpha_t * loss
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def fused_loss(x, z, reduction):
    return fs.sigmoid_focal_loss(x, z, ALPHA, GAMMA, reduction)


def implementations(names):
    torch._dynamo.reset()
    impls = {"fused_sigxent": fused_loss, "torchvision_eager": torchvision_loss,
             "torchvision_compile": torch.compile(torchvision_loss)}
    return {name: impls[name] for name in names}


def bytes_min(x, z, pass_):
    """Fewest bytes a pass moves: forward reads logits and targets; backward
    writes the logits' gradient (reading them again where it recomputes is
    not counted: that is the implementation's choice); fwd+bwd both."""
    fwd = x.numel() * (x.element_size() + z.element_size())
    bwd = x.numel() * x.element_size()
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def measure(fn, x, z, reduction, dev, reps):
    xg = x.detach().requires_grad_()

    def forward():
        return fn(xg, z, reduction)

    def graph():
        return fn(x.detach().requires_grad_(), z, reduction)

    def step():
        xg.grad = None
        forward().backward()

    return {
        "fwd": _bench.time_ms(forward, dev, reps),
        "bwd": _bench.time_ms(lambda loss: loss.backward(), dev, reps, setup=graph),
        "fwd+bwd": _bench.time_ms(step, dev, reps),
    }


def summary(frame: pd.DataFrame) -> str:
    """Median ms per case and pass, and the speedup over each baseline."""
    table = frame.pivot_table(index=["case", "dtype", "label_dtype", "numel", "pass"], columns="impl",
                              values="median_ms").reset_index()
    for base in ("torchvision_eager", "torchvision_compile"):
        if base in table and "fused_sigxent" in table:
            table[f"x vs {base}"] = (table[base] / table["fused_sigxent"]).round(2)
    return table.to_markdown(index=False, floatfmt=".3f")


def _list(kind):
    return lambda text: [kind(item) for item in text.split(",")]


def parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smallest case only, for a smoke test")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: the GPU where there is one)")
    parser.add_argument("--out", default=None, help="CSV path (default perf/results/focal-<device>-<date>.csv)")
    parser.add_argument("--numel", type=_list(int), help="comma-separated element counts, swept in this order")
    parser.add_argument("--classes", type=_list(int), help=f"comma-separated class counts (default {CLASSES})")
    parser.add_argument("--sample-ms", type=float, default=None, help="ms of calls to time per pass, at "
                        f"least {_bench.MIN_SAMPLES} samples (default {_bench.SAMPLE_BUDGET_MS:g})")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds: start no case after this "
                        "long (the CSV is rewritten after every case)")
    parser.add_argument("--dry-run", action="store_true", help="list the cases and exit")
    return parser


def cases(dev, args):
    """(numel, classes, logits dtype, labels dtype) of each case, in sweep order."""
    numels = args.numel or (GPU_NUMELS if dev.type == "cuda" else CPU_NUMELS)
    classes = args.classes or CLASSES
    if args.quick:
        numels, classes = numels[:1], classes[:1]
    return [(numel, c, dtype, label_dtype) for numel in numels for c in classes
            for dtype, label_dtype in DTYPE_LABELS if c <= numel]


def planned(argv) -> list[str]:
    """The cases `main(argv)` would sweep, one line each (nothing is timed)."""
    args = parser().parse_args(argv)
    return [f"numel={numel} C={c} {str(d).replace('torch.', '')}/{str(l).replace('torch.', '')} "
            f"{'/'.join(REDUCTIONS)}" for numel, c, d, l in cases(_bench.device(args.device), args)]


def write(rows, out, env, final=False) -> list[str]:
    """The CSV (rewritten after every case); with `final`, the summary page
    and plots too. Returns the paths written."""
    frame = pd.DataFrame(rows, columns=_bench.COLUMNS)
    frame["peak_mem_bytes"] = frame["peak_mem_bytes"].astype("Int64")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    frame.to_csv(out, index=False)
    if not final or frame.empty:
        return [out]
    stem = out[:-len(".csv")]
    pngs = report.plots(frame, stem, baseline="torchvision_eager")
    with open(stem + ".md", "w") as f:
        f.write(f"# Focal loss: fused_sigxent vs torchvision's formula ({env['device']})\n\n")
        f.write(f"torch {env['torch_version']}, commit {env['commit']}; gamma={GAMMA}, alpha={ALPHA}; "
                "median ms per call (fwd: the loss with its graph; bwd: loss.backward(); fwd+bwd: both), "
                "and how many times faster fused_sigxent is. "
                + ("Peak memory: CUDA's allocator peak above the inputs (in the CSV). " if frame["peak_mem_bytes"].notna().any()
                   else "Peak memory is not measured on the CPU here (see the loss sweep for how). ")
                + "Written by `python -m perf.sweep_focal`.\n\n")
        f.write(summary(frame) + "\n")
        if pngs:
            f.write("\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs) + "\n")
    return [out, stem + ".md"] + pngs


def main(argv=None):
    started = time.perf_counter()
    args = parser().parse_args(argv)
    if args.dry_run:
        print("\n".join(planned(argv)))
        return
    dev = _bench.device(args.device)
    env = _bench.environment(dev)
    if dev.type == "cuda":
        print(f"focal loss sweep on {env['device']}")
    else:
        print(f"focal loss, CPU-only run (no GPU): {env['device']}; fused_sigxent's CPU path (its focal tiles) "
              "against torchvision's formula, eager and under torch.compile")
    copy_bw = _bench.copy_bandwidth_gbps(dev)
    reps = 15 if dev.type == "cpu" else 100
    if args.sample_ms:
        _bench.SAMPLE_BUDGET_MS = args.sample_ms
    out = args.out or _bench.results_csv("focal-", dev, "-quick" if args.quick else "")
    all_cases = cases(dev, args)
    rows, stopped = [], None
    for k, (numel, classes, dtype, label_dtype) in enumerate(all_cases):
        if args.time_limit is not None and time.perf_counter() - started > args.time_limit:
            stopped = f"{k} of {len(all_cases)} cases: time limit ({args.time_limit:.0f} s) reached"
            print(stopped, flush=True)
            break
        gen = torch.Generator().manual_seed(0)
        shape = (numel // classes, classes)
        x = (torch.randn(shape, generator=gen) * 3).to(dev, dtype)
        z = (torch.rand(shape, generator=gen) > 0.9).to(dev, label_dtype)
        for reduction in REDUCTIONS:
            case = f"focal g={GAMMA:g} a={ALPHA:g}/{reduction}/C={classes}"
            print(f"[{k + 1}/{len(all_cases)}] {case} numel={numel} {dtype} labels={label_dtype}", flush=True)
            want = torchvision_loss(x.double(), z, reduction)
            for name, fn in implementations(IMPLS).items():
                got = fn(x, z, reduction)
                torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=1e-3)
                timed = measure(fn, x, z, reduction, dev, reps)
                peaks = {}
                if dev.type == "cuda":  # CUDA's allocator counts exactly, in this process
                    xg = x.detach().requires_grad_()

                    def reset():
                        xg.grad = None

                    peaks = _memory.pass_peaks(functools.partial(fn, xg, z, reduction), lambda loss: loss.backward(), reset, dev)
                print(f"    {name:22}" + "  ".join(f"{p} {m:.3f} ms" for p, (m, _, _) in timed.items()), flush=True)
                for pass_, (med, p20, p80) in timed.items():
                    nbytes = bytes_min(x, z, pass_)
                    gbps = nbytes / (med * 1e-3) / 1e9
                    rows.append(dict(
                        env, impl=name, case=case, dtype=str(dtype).replace("torch.", ""),
                        label_dtype=str(label_dtype).replace("torch.", ""), weight=False, pos_weight=False,
                        label_smoothing=0.0, reduction=reduction, numel=numel,
                        shape="x".join(map(str, shape)), **{"pass": pass_}, median_ms=med, p20_ms=p20,
                        p80_ms=p80, bytes_min=nbytes, gbps=gbps, pct_copy_bw=100 * gbps / copy_bw,
                        peak_mem_bytes=peaks.get(pass_)))
        del x, z
        write(rows, out, env)
    paths = write(rows, out, env, final=True)
    print(f"wrote {', '.join(paths)}; took {time.perf_counter() - started:.0f} s")
    return stopped


if __name__ == "__main__":
    main()
