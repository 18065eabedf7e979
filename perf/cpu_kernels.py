"""The CPU path's functions (`fused_sigxent/impl/cpu.py`) timed against PyTorch eager, and their compiled route.

The loss sweep's CPU cases: numel 64K, 1M, 16M shaped (N/1024, 1024); float32
logits/labels and bfloat16 logits with uint8 labels; plain, per-class weight,
per-class pos_weight, both + smoothing 0.1; PyTorch's mean. Two passes:
  fwd      the loss under no_grad (ours: `sigmoid_ce_fwd`, no gradient);
  fwd+bwd  a training step's loss part (ours: `sigmoid_ce_fwd` writing the
           final gradient, then `sigmoid_ce_scale_` with grad 1; eager:
           `F.binary_cross_entropy_with_logits(...).backward()`).
Ours is timed without the op's dispatch and autograd (that fixed per-call
cost is measured by `perf.host_overhead`), eager with its autograd, as a
user calls it. Times are medians of interleaved calls (ours, eager, ours, ...).
`--memory`: peak resident memory above the inputs per pass, in a fresh
process per case (perf._memory). `--compiled`: torch.compile of our loss
against torch.compile of PyTorch's, fwd+bwd.

    python -m perf.cpu_kernels [--numel 65536,1048576] [--memory] [--compiled]
"""

import argparse
import itertools
import statistics
import time

import torch

import fused_sigxent as fs
from fused_sigxent.impl import cpu as _cpu
from fused_sigxent.core import reduction as R

from . import _memory
from .sweep_loss import FEATURES, eager_loss, make_inputs

NUMELS = [1 << 16, 1 << 20, 1 << 24]
CLASSES = 1024
PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.uint8)]
# Calls per measurement: enough for a stable median at each size in a few
# seconds per case on a 2-core machine.
REPS = {1 << 16: 200, 1 << 20: 40, 1 << 24: 7}


def ours(x, z, w, p, s, train):
    smoothing = torch.tensor(s, dtype=torch.float32)
    if not train:
        return lambda: _cpu.sigmoid_ce_fwd(x, z, w, p, smoothing, R.TORCH_MEAN, x.dtype, False, False)[0]
    one = torch.ones((), dtype=torch.float32)

    def step():
        loss, _, gx, gz = _cpu.sigmoid_ce_fwd(x, z, w, p, smoothing, R.TORCH_MEAN, x.dtype, True, False)
        _cpu.sigmoid_ce_scale_(one, gx, gz)
        return loss, gx
    return step


def eager(x, z, w, p, s, train):
    if not train:
        def forward():
            with torch.no_grad():
                return eager_loss(x, z, w, p, s, "mean")
        return forward
    xg = x.detach().requires_grad_()

    def step():
        xg.grad = None
        eager_loss(xg, z, w, p, s, "mean").backward()
        return xg.grad
    step.reset = lambda: setattr(xg, "grad", None)
    return step


def compiled(fn, x, z, w, p, s):
    """A compiled training step's loss part. `fn` itself is compiled, so that
    ours and PyTorch's are different code objects, each with its own graph
    (one shared lambda would make them guard-fail on each other by turns)."""
    loss_fn = torch.compile(fn, dynamic=False)
    xg = x.detach().requires_grad_()

    def step():
        xg.grad = None
        loss_fn(xg, z, w, p, s, "mean").backward()
        return xg.grad
    return step


def fused(x, z, w, p, s, reduction):
    return fs.binary_cross_entropy_with_logits(x, z, w, reduction, p, label_smoothing=s)


def interleaved_ms(fns, reps, stat=statistics.median):
    """ms per call of each function (`stat` of the calls: the median, or the
    minimum on a machine shared with other load), calls interleaved so that
    drift (frequency, other load) hits all alike; one warm-up call each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for t, fn in zip(times, fns):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [stat(t) * 1e3 for t in times]


def memory_child(impl, numel, dtype, label_dtype, feature, train):
    """Peak resident bytes above the inputs of one pass (a fresh process)."""
    x, z, w, p, s = make_inputs(numel, CLASSES, getattr(torch, dtype), getattr(torch, label_dtype), feature, "cpu")
    fn = (ours if impl == "ours" else eager)(x, z, w, p, s, train)
    fn()
    getattr(fn, "reset", lambda: None)()  # the step's gradient counts in its peak, not in the base
    return {"peak": _memory.rss_peak(fn)}


def peak(impl, numel, dtype, label_dtype, feature, train):
    args = dict(impl=impl, numel=numel, dtype=str(dtype).split(".")[-1],
                label_dtype=str(label_dtype).split(".")[-1], feature=feature, train=train)
    return _memory.run_child("cpu_kernels", args).get("peak", float("nan"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--numel", type=lambda t: [int(n) for n in t.split(",")], default=NUMELS)
    parser.add_argument("--feature", type=lambda t: t.split(","), default=list(FEATURES))
    parser.add_argument("--dtype", type=lambda t: t.split(","), default=None)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--compiled", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--stat", choices=["median", "min"], default="median",
                        help="min where other processes share the cores (their load only adds time)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    args = parser.parse_args(argv)
    stat = getattr(statistics, args.stat) if args.stat == "median" else min
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = [pr for pr in PAIRS if args.dtype is None or str(pr[0]).split(".")[-1] in args.dtype]
    header = "numel     dtype/labels      feature         pass     ours ms  eager ms  speed-up"
    if args.memory:
        header += "  ours MiB  eager MiB"
    print(header)
    speedups = {"fwd": [], "fwd+bwd": []}
    for numel, (dtype, label_dtype), feature in itertools.product(args.numel, pairs, args.feature):
        x, z, w, p, s = make_inputs(numel, CLASSES, dtype, label_dtype, feature, "cpu")
        reps = args.reps or REPS.get(numel, 20)
        if args.compiled:
            torch._dynamo.reset()
            c_ours = compiled(fused, x, z, w, p, s)
            c_eager = compiled(eager_loss, x, z, w, p, s)
            a, b = interleaved_ms([c_ours, c_eager], reps, stat)
            print(f"{numel:<9} {str(dtype)[6:]}/{str(label_dtype)[6:]:<8} {feature:<15} compiled {a:8.3f} {b:9.3f}"
                  f"  ratio {a / b:.2f}", flush=True)
            continue
        for train in (False, True):
            name = "fwd+bwd" if train else "fwd"
            a, b = interleaved_ms([ours(x, z, w, p, s, train), eager(x, z, w, p, s, train)], reps, stat)
            speedups[name].append(b / a)
            line = (f"{numel:<9} {str(dtype)[6:]}/{str(label_dtype)[6:]:<8} {feature:<15} {name:<8}"
                    f" {a:8.3f} {b:9.3f} {b / a:8.2f}")
            if args.memory:
                mib = [peak(impl, numel, dtype, label_dtype, feature, train) / 2**20 for impl in ("ours", "eager")]
                line += f"  {mib[0]:8.1f} {mib[1]:9.1f}"
            print(line, flush=True)
    for name, values in speedups.items():
        if values:
            print(f"{name}: speed-up median {statistics.median(values):.2f}, worst {min(values):.2f}")


if __name__ == "__main__":
    main()
