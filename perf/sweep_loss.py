"""The loss sweep: sizes x dtypes x features x reductions x implementations x
passes, one CSV row per measurement, then the report."""

import argparse
import itertools
import os
import time

import torch
import torch.nn.functional as F

import fused_sigxent as fs

from . import _bench, _memory

# Sizes: numel x classes C, shaped (numel // C, C). GPU: 1M..256M elements.
# CPU (a 2-core machine): (N/1024, 1024) with N = 64K (where per-call
# overheads show), 1M and 16M; float32 logits with float32 labels, and bf16
# logits with uint8 labels (a mixed-precision classifier's). These are the
# full sweep's; `python -m perf` passes its own (perf/plan.py).
GPU_NUMELS = [1 << 20, 1 << 24, 1 << 26, 1 << 28]
CPU_NUMELS = [1 << 16, 1 << 20, 1 << 24]
GPU_CLASSES = [1, 128, 1000, 100000]
CPU_CLASSES = [1024]
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
CPU_DTYPES = [torch.float32, torch.bfloat16]
# (logits dtype, labels): "same" = the logits' dtype. The GPU sweeps every
# pair of GPU_DTYPES x labels; the CPU only these.
CPU_DTYPE_LABELS = [(torch.float32, "same"), (torch.bfloat16, "uint8")]
FEATURES = {
    "plain": dict(weight=False, pos_weight=False, label_smoothing=0.0),
    "weight": dict(weight=True, pos_weight=False, label_smoothing=0.0),
    "pos_weight": dict(weight=False, pos_weight=True, label_smoothing=0.0),
    "both+smoothing": dict(weight=True, pos_weight=True, label_smoothing=0.1),
}
GPU_REDUCTIONS = ["mean", "none"]
CPU_REDUCTIONS = ["mean"]
PASSES = ["fwd", "bwd", "fwd+bwd"]


def eager_loss(x, z, w, p, s, reduction):
    """PyTorch's loss with the same semantics: labels cast to the logits
    dtype (PyTorch takes no byte labels) and smoothed in a separate op."""
    target = z.to(x.dtype)
    if s:
        target = target * (1 - s) + 0.5 * s
    return F.binary_cross_entropy_with_logits(x, target, w, reduction=reduction, pos_weight=p)


def fused_loss(x, z, w, p, s, reduction):
    return fs.binary_cross_entropy_with_logits(x, z, w, reduction, p, label_smoothing=s)


IMPLS = ["fused_sigxent", "torch_eager", "torch_compile", "fused_sigxent_compile"]


def implementations(dev, names=None):
    """{name: loss function}, fresh per case: the compiled ones are compiled
    anew for each case (after a dynamo reset), so no case runs past dynamo's
    recompile limit into eager, and each is compiled for its static shapes.
    `fused_sigxent_compile` is torch.compile of a call to our loss, compared
    with `torch_compile` (the same for PyTorch's)."""
    unknown = set(names or []) - set(IMPLS)
    if unknown:
        raise ValueError(f"unknown implementation(s) {sorted(unknown)}: use {', '.join(IMPLS)}")
    names = [name for name in IMPLS if name in (names or IMPLS)]
    if any(name.endswith("_compile") for name in names):
        torch._dynamo.reset()
    impls = {"fused_sigxent": lambda: fused_loss, "torch_eager": lambda: eager_loss,
             "torch_compile": lambda: torch.compile(eager_loss, dynamic=False),
             "fused_sigxent_compile": lambda: torch.compile(fused_loss, dynamic=False)}
    return {name: impls[name]() for name in names}


def bytes_min(x, z, w, p, reduction, pass_):
    """Every input read once, every output written once:
      fwd:     x, z, w, p read; loss written (numel elements for none, else 1)
      bwd:     x, z, w, p and the incoming gradient read; dx written
      fwd+bwd: x, z, w, p read once; loss and dx written once (the incoming
               gradient of a none loss read once)
    """
    n, ex = x.numel(), x.element_size()
    inputs = n * ex + z.numel() * z.element_size()
    inputs += sum(t.numel() * t.element_size() for t in (w, p) if t is not None)
    loss_bytes = n * ex if reduction == "none" else ex
    if pass_ == "fwd":
        return inputs + loss_bytes
    if pass_ == "bwd":
        return inputs + loss_bytes + n * ex
    return inputs + loss_bytes + n * ex + (loss_bytes if reduction == "none" else 0)


def make_inputs(numel, classes, dtype, label_dtype, feature, dev, seed=0):
    gen = torch.Generator().manual_seed(seed)  # the same case's inputs in a memory child as in the sweep
    shape = (numel // classes, classes)
    x = torch.randn(shape, generator=gen).to(dev, dtype)
    z = torch.rand(shape, generator=gen)
    z = ((z > 0.5) if label_dtype == torch.uint8 else z).to(dev, label_dtype)
    f = FEATURES[feature]
    w = torch.rand(classes, generator=gen).to(dev, dtype) if f["weight"] else None
    p = (torch.rand(classes, generator=gen) * 2).to(dev, dtype) if f["pos_weight"] else None
    return x, z, w, p, f["label_smoothing"]


TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def reference(x, z, w, p, s, reduction):
    """Loss and logits gradient of the reference path (float32 math), once
    per case, for `check`."""
    old = os.environ.get("FUSED_SIGXENT_BACKEND")
    os.environ["FUSED_SIGXENT_BACKEND"] = "reference"
    try:
        xr = x.detach().requires_grad_()
        ref = fused_loss(xr, z, w, p, s, reduction)
        (ref_grad,) = torch.autograd.grad(ref.float().sum(), xr)
    finally:
        if old is None:
            os.environ.pop("FUSED_SIGXENT_BACKEND")
        else:
            os.environ["FUSED_SIGXENT_BACKEND"] = old
    return ref.detach(), ref_grad


def check(name, fn, x, z, w, p, s, reduction, expected):
    """Loss and logits gradient of `fn` against `expected` (`reference`'s);
    a mismatch stops the sweep. The first call also compiles a compiled `fn`."""
    ref, ref_grad = expected
    xi = x.detach().requires_grad_()
    out = fn(xi, z, w, p, s, reduction)
    (grad,) = torch.autograd.grad(out.float().sum(), xi)
    tol = TOLERANCE[x.dtype]
    for what, a, b in [("loss", out, ref), ("grad", grad, ref_grad)]:
        # PyTorch eager runs bf16/fp16 math in that dtype, so its error scales
        # with the largest value, not each element: atol relative to the max.
        if not torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * b.float().abs().max().item()):
            err = (a.float() - b.float()).abs().max().item()
            raise RuntimeError(f"{name} {what} differs from the reference by {err:.3g} ({x.dtype}, {reduction})")


def passes(fn, x, z, w, p, s, reduction):
    """The three passes of a training step's loss, as callables:
      forward():      the loss, with its graph (logits require grad);
      backward(loss): loss.backward(), with an all-ones incoming gradient for
                      reduction="none";
      graph():        a fresh leaf and the loss's graph on it, for timing a
                      backward on its own (each timed backward needs a graph
                      of its own, made untimed; its gradient lands in a
                      leaf of its own, as after zero_grad(set_to_none=True));
      step():         forward then backward, the leaf's gradient reset first;
      reset():        drops the leaf's gradient."""
    xg = x.detach().requires_grad_()
    grad_out = torch.ones_like(x) if reduction == "none" else None

    def forward():
        return fn(xg, z, w, p, s, reduction)

    def backward(loss):
        loss.backward(grad_out)

    def graph():
        return fn(x.detach().requires_grad_(), z, w, p, s, reduction)

    def step():
        xg.grad = None
        backward(forward())

    def reset():
        xg.grad = None

    return forward, backward, graph, step, reset


def measure(fn, x, z, w, p, s, reduction, dev, reps):
    """{pass: (median, p20, p80)} in ms per call, each pass timed as the call
    the user makes: fwd is the forward (building the graph); bwd is
    `loss.backward()` itself, autograd engine included, on a fresh graph per
    call built untimed (a fused forward may have written the gradient
    already: the backward still costs its dispatch, the engine and the
    scaling by the incoming gradient); fwd+bwd is both."""
    forward, backward, graph, step, _ = passes(fn, x, z, w, p, s, reduction)
    return {
        "fwd": _bench.time_ms(forward, dev, reps),
        "bwd": _bench.time_ms(backward, dev, reps, setup=graph),
        "fwd+bwd": _bench.time_ms(step, dev, reps),
    }


def case_child(impl, numel, classes, dtype, label_dtype, feature, reduction, reps, memory, sample_ms=None,
               device="cpu"):
    """In a fresh process (perf._memory.run_child, with its allocator
    settings where `memory`): one implementation's peak memory per pass
    (first, while nothing freed before can hide in the heap; see
    perf/_memory.py), then its `check` and `measure` with the allocator
    settled for timing. {"peaks": {pass: bytes}, "times": {pass: [median,
    p20, p80]}}. One process for both: each costs an interpreter start and,
    compiled, a compilation, which took as long as the measurements.
    sample_ms: `_bench.SAMPLE_BUDGET_MS` for this child (None: its default)."""
    if sample_ms:
        _bench.SAMPLE_BUDGET_MS = sample_ms
    dev = torch.device(device)
    x, z, w, p, s = make_inputs(numel, classes, getattr(torch, dtype), getattr(torch, label_dtype), feature, dev)
    fn = implementations(dev, [impl])[impl]
    peaks = {}
    if memory:
        forward, backward, _, _, reset = passes(fn, x, z, w, p, s, reduction)
        peaks = _memory.pass_peaks(forward, backward, reset, dev)
    check(impl, fn, x, z, w, p, s, reduction, reference(x, z, w, p, s, reduction))
    times = {pass_: list(t) for pass_, t in measure(fn, x, z, w, p, s, reduction, dev, reps).items()}
    return {"peaks": peaks, "times": times}


def cases(dev, args):
    """The sweep's cases, narrowed by --quick and the filter options (so a
    full GPU sweep can run as several shorter commands whose CSVs `report`
    combines, and `python -m perf` can name its sizes)."""
    gpu = dev.type == "cuda"
    numels = args.numel or (GPU_NUMELS if gpu else CPU_NUMELS)
    classes = args.classes or (GPU_CLASSES if gpu else CPU_CLASSES)
    features = args.feature or list(FEATURES)
    reductions = args.reduction or (GPU_REDUCTIONS if gpu else CPU_REDUCTIONS)
    if args.pairs:
        pairs = args.pairs
    elif args.dtype or args.labels or gpu:
        dtypes = [getattr(torch, d) for d in args.dtype] if args.dtype else (GPU_DTYPES if gpu else CPU_DTYPES)
        pairs = list(itertools.product(dtypes, args.labels or ["same", "uint8"]))
    else:
        pairs = CPU_DTYPE_LABELS
    if args.quick:
        numels, classes, pairs, features = numels[:1], classes[:1], pairs[:1], ["plain", "both+smoothing"]
        reductions = reductions[:1]
    for numel, c, (dtype, label), feature, reduction in itertools.product(
            numels, classes, pairs, features, reductions):
        if c <= numel:
            yield numel, c, dtype, dtype if label == "same" else torch.uint8, feature, reduction


def _pair(text):
    """"bfloat16/uint8" -> (torch.bfloat16, "uint8"); labels "same" or the logits' own dtype name mean the same."""
    dtype, label = text.split("/")
    return getattr(torch, dtype), "same" if label in ("same", dtype) else label


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _list(kind):
    return lambda text: [kind(item) for item in text.split(",")]


def parser():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few cases, for a smoke test")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: the GPU where there is one)")
    parser.add_argument("--out", default=None, help="CSV path (default perf/results/<device>-<date>.csv)")
    parser.add_argument("--impl", type=_list(str), help=f"comma-separated: {', '.join(IMPLS)}")
    parser.add_argument("--numel", type=_list(int), help="comma-separated element counts, swept in this order")
    parser.add_argument("--classes", type=_list(int), help="comma-separated class counts C")
    parser.add_argument("--dtype", type=_list(str), help="comma-separated logits dtypes (bfloat16,float16,float32)")
    parser.add_argument("--labels", type=_list(str), help="comma-separated: same, uint8")
    parser.add_argument("--pairs", type=_list(_pair), help="comma-separated logits/labels dtype pairs, "
                        "e.g. bfloat16/uint8,float32/same (instead of every --dtype x --labels)")
    parser.add_argument("--feature", type=_list(str), help=f"comma-separated: {', '.join(FEATURES)}")
    parser.add_argument("--reduction", type=_list(str), help="comma-separated: mean, none")
    parser.add_argument("--no-memory", action="store_true", help="leave peak_mem_bytes empty (on the CPU "
                        "its child processes take about as long as the timing)")
    parser.add_argument("--part", default="1/1", help="K/N: run every N-th case from the K-th (1-based), "
                        "so N commands of bounded length cover the sweep")
    parser.add_argument("--sample-ms", type=float, default=None, help="ms of calls to time per pass, at "
                        f"least {_bench.MIN_SAMPLES} samples (default {_bench.SAMPLE_BUDGET_MS:g})")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds: start no case after this "
                        "long; the CSV and report then hold the cases done (the CSV is rewritten after every case)")
    parser.add_argument("--dry-run", action="store_true", help="list the cases and exit")
    return parser


def planned(argv) -> list[str]:
    """The cases `main(argv)` would sweep, one line each (nothing is timed)."""
    args = parser().parse_args(argv)
    k_part, n_parts = map(int, args.part.split("/"))
    return [f"numel={numel} C={c} {_name(dtype)}/{_name(label)} {feature} {reduction}"
            for numel, c, dtype, label, feature, reduction
            in list(cases(_bench.device(args.device), args))[k_part - 1::n_parts]]


def write_csv(rows, out):
    import pandas as pd  # here, not above: each child process would import it for nothing

    frame = pd.DataFrame(rows, columns=_bench.COLUMNS)
    frame["peak_mem_bytes"] = frame["peak_mem_bytes"].astype("Int64")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    frame.to_csv(out, index=False)
    return frame


def main(argv=None):
    started = time.perf_counter()
    args = parser().parse_args(argv)
    if args.dry_run:
        print("\n".join(planned(argv)))
        return
    dev = _bench.device(args.device)
    env = _bench.environment(dev)
    impl_names = args.impl or IMPLS
    if dev.type == "cuda":
        print(f"GPU sweep on {env['device']}")
    else:
        print(f"CPU-only run (no GPU): {env['device']}; fused_sigxent's CPU path against PyTorch eager, "
              "and both under torch.compile")
    copy_bw = _bench.copy_bandwidth_gbps(dev)
    print(f"copy bandwidth: {copy_bw:.1f} GB/s")
    # Samples per measurement, at most (CPU: fewer for long calls; see _bench).
    # 45 on the CPU: 15 samples of a 64K-element call span 30 ms, and one
    # sweep read a compiled step at 0.248 ms where it reads 0.14 ms with
    # fwd and bwd timed at 0.081 and 0.048 just before (a burst of other load).
    reps = 45 if dev.type == "cpu" else 100
    if args.sample_ms:  # here for a GPU's timing in this process; a CPU child gets it with its spec
        _bench.SAMPLE_BUDGET_MS = args.sample_ms
    memory = not args.no_memory and (dev.type == "cuda" or _memory.rss_available())
    rows = []
    out = args.out or _bench.results_csv("", dev, "-quick" if args.quick else "")
    k_part, n_parts = map(int, args.part.split("/"))
    all_cases = list(cases(dev, args))[k_part - 1::n_parts]
    done, stopped = 0, None
    for k, (numel, c, dtype, label_dtype, feature, reduction) in enumerate(all_cases):
        if args.time_limit is not None and time.perf_counter() - started > args.time_limit:
            stopped = f"{done} of {len(all_cases)} cases: time limit ({args.time_limit:.0f} s) reached"
            print(stopped, flush=True)
            break
        x, z, w, p, s = make_inputs(numel, c, dtype, label_dtype, feature, dev)
        case = f"{feature}/{reduction}/C={c}"
        print(f"[{k + 1}/{len(all_cases)}] {case} numel={numel} {dtype} labels={label_dtype}", flush=True)
        expected = reference(x, z, w, p, s, reduction) if dev.type == "cuda" else None
        for name, fn in implementations(dev, impl_names).items():
            spec = dict(impl=name, numel=numel, classes=c, dtype=_name(dtype), label_dtype=_name(label_dtype),
                        feature=feature, reduction=reduction)
            if dev.type == "cuda":
                check(name, fn, x, z, w, p, s, reduction, expected)
                timed = measure(fn, x, z, w, p, s, reduction, dev, reps)
                peaks = {}
                if memory:
                    forward, backward, _, _, reset = passes(fn, x, z, w, p, s, reduction)
                    peaks = _memory.pass_peaks(forward, backward, reset, dev)
            else:
                # Measured in a process of its own, compiled there once: on the
                # CPU a call's time depends on what the process allocated before
                # it (glibc serves a large block from freed heap, or maps and
                # faults it in afresh; timed in the sweep's own process,
                # torch.compile's 16M-element bf16 backward read 4.7 ms after
                # some cases and 10 ms after others), and its peak memory on
                # what it freed before.
                result = _memory.run_child("sweep_loss", dict(spec, reps=reps, memory=memory,
                                                              sample_ms=args.sample_ms), "case_child",
                                           env=None if memory else {})
                if not result:
                    raise RuntimeError(f"child process for {name} {case} failed")
                timed, peaks = result["times"], result["peaks"]
            print(f"    {name:22}" + "  ".join(f"{pass_} {med:.3f} ms" for pass_, (med, _, _) in timed.items()),
                  flush=True)
            for pass_, (med, p20, p80) in timed.items():
                nbytes = bytes_min(x, z, w, p, reduction, pass_)
                gbps = nbytes / (med * 1e-3) / 1e9
                rows.append(dict(
                    env, impl=name, case=case, dtype=_name(dtype), label_dtype=_name(label_dtype),
                    weight=w is not None, pos_weight=p is not None, label_smoothing=s, reduction=reduction,
                    numel=numel, shape="x".join(map(str, x.shape)), **{"pass": pass_}, median_ms=med, p20_ms=p20,
                    p80_ms=p80, bytes_min=nbytes, gbps=gbps, pct_copy_bw=100 * gbps / copy_bw,
                    peak_mem_bytes=peaks.get(pass_),
                ))
        del x, z, w, p, expected
        done += 1
        write_csv(rows, out)  # so a sweep stopped from outside leaves the cases it finished
    frame = write_csv(rows, out)
    print(f"wrote {len(frame)} rows to {out}")
    if len(frame):
        from . import report

        for path in report.build(out):
            print(f"wrote {path}")
    print(f"sweep took {time.perf_counter() - started:.0f} s")
    return stopped


if __name__ == "__main__":
    main()
