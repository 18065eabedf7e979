"""The loss sweep: sizes x dtypes x features x reductions x implementations x
passes, one CSV row per measurement (SPEC section 4), then the report."""

import argparse
import itertools
import os

import pandas as pd
import torch
import torch.nn.functional as F

import fused_sigxent as fs

from . import _bench, report

# Sizes: numel x classes C, shaped (numel // C, C). GPU: 1M..256M elements;
# CPU (CI's machine): small enough to finish in a minute or two.
GPU_NUMELS = [1 << 20, 1 << 24, 1 << 26, 1 << 28]
CPU_NUMELS = [1 << 16, 1 << 20]
CLASSES = [1, 128, 1000, 100000]
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
CPU_DTYPES = [torch.bfloat16, torch.float32]
FEATURES = {
    "plain": dict(weight=False, pos_weight=False, label_smoothing=0.0),
    "weight": dict(weight=True, pos_weight=False, label_smoothing=0.0),
    "pos_weight": dict(weight=False, pos_weight=True, label_smoothing=0.0),
    "both+smoothing": dict(weight=True, pos_weight=True, label_smoothing=0.1),
}
REDUCTIONS = ["mean", "none"]
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


def implementations(dev):
    """Fresh per case: torch_compile is compiled anew for each case (after a
    dynamo reset), so no case runs past dynamo's recompile limit into eager."""
    impls = {"fused_sigxent": fused_loss, "torch_eager": eager_loss}
    if dev.type == "cuda":
        torch._dynamo.reset()
        impls["torch_compile"] = torch.compile(eager_loss, dynamic=False)
    return impls


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


def make_inputs(numel, classes, dtype, label_dtype, feature, dev):
    shape = (numel // classes, classes)
    x = torch.randn(shape, device=dev).to(dtype)
    z = torch.rand(shape, device=dev)
    z = (z > 0.5).to(label_dtype) if label_dtype == torch.uint8 else z.to(label_dtype)
    f = FEATURES[feature]
    w = torch.rand(classes, device=dev).to(dtype) if f["weight"] else None
    p = (torch.rand(classes, device=dev) * 2).to(dtype) if f["pos_weight"] else None
    return x, z, w, p, f["label_smoothing"]


TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def check(name, fn, x, z, w, p, s, reduction):
    """Loss and logits gradient of `fn` against the reference path (float32
    math) on the same inputs; a mismatch stops the sweep."""
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


def measure(fn, x, z, w, p, s, reduction, dev, reps):
    """{pass: (median, p20, p80, peak)}. fwd and fwd+bwd are timed; bwd is
    fwd+bwd minus fwd (the fused forward writes the gradient, so a backward
    cannot be replayed on its own), its spread taken from fwd+bwd."""
    xg = x.detach().requires_grad_()
    grad_out = None

    def forward():
        return fn(xg, z, w, p, s, reduction)

    def step():
        xg.grad = None
        loss = forward()
        loss.backward(grad_out if reduction == "none" else None)

    if reduction == "none":
        grad_out = torch.ones(x.shape, device=dev, dtype=x.dtype)
    fwd = _bench.time_ms(forward, dev, reps)
    full = _bench.time_ms(step, dev, reps)
    bwd_med = max(full[0] - fwd[0], 0.0)
    return {
        "fwd": (*fwd, _bench.peak_memory(forward, dev)),
        "bwd": (bwd_med, max(full[1] - fwd[0], 0.0), max(full[2] - fwd[0], 0.0), None),
        "fwd+bwd": (*full, _bench.peak_memory(step, dev)),
    }


def cases(dev, args):
    """The sweep's cases, narrowed by --quick and the filter options (so a
    full GPU sweep can run as several shorter commands whose CSVs `report`
    combines)."""
    numels = args.numel or (GPU_NUMELS if dev.type == "cuda" else CPU_NUMELS)
    dtypes = [getattr(torch, d) for d in args.dtype] if args.dtype else (GPU_DTYPES if dev.type == "cuda" else CPU_DTYPES)
    classes = args.classes or CLASSES
    features = args.feature or list(FEATURES)
    reductions = args.reduction or REDUCTIONS
    labels = args.labels or ["same", "uint8"]
    if args.quick:
        numels, dtypes, classes, features = numels[:1], dtypes[:1], [1000], ["plain", "both+smoothing"]
    for numel, c, dtype, label, feature, reduction in itertools.product(
            numels, classes, dtypes, labels, features, reductions):
        if c <= numel:
            yield numel, c, dtype, dtype if label == "same" else torch.uint8, feature, reduction


def _list(kind):
    return lambda text: [kind(item) for item in text.split(",")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few cases, for a smoke test")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: the GPU where there is one)")
    parser.add_argument("--out", default=None, help="CSV path (default perf/results/<device>-<date>.csv)")
    parser.add_argument("--numel", type=_list(int), help="comma-separated element counts")
    parser.add_argument("--classes", type=_list(int), help="comma-separated class counts C")
    parser.add_argument("--dtype", type=_list(str), help="comma-separated logits dtypes (bfloat16,float16,float32)")
    parser.add_argument("--labels", type=_list(str), help="comma-separated: same, uint8")
    parser.add_argument("--feature", type=_list(str), help=f"comma-separated: {', '.join(FEATURES)}")
    parser.add_argument("--reduction", type=_list(str), help="comma-separated: mean, none")
    parser.add_argument("--part", default="1/1", help="K/N: run every N-th case from the K-th (1-based), "
                        "so N commands of bounded length cover the sweep")
    args = parser.parse_args(argv)
    dev = _bench.device(args.device)
    env = _bench.environment(dev)
    if dev.type == "cuda":
        print(f"GPU sweep on {env['device']}")
    else:
        print(f"CPU run (no GPU): {env['device']}; sweeping the reference path and PyTorch eager, small sizes")
    copy_bw = _bench.copy_bandwidth_gbps(dev)
    print(f"copy bandwidth: {copy_bw:.1f} GB/s")
    reps = 10 if dev.type == "cpu" else 100
    rows = []
    k_part, n_parts = map(int, args.part.split("/"))
    all_cases = list(cases(dev, args))[k_part - 1::n_parts]
    for k, (numel, c, dtype, label_dtype, feature, reduction) in enumerate(all_cases):
        x, z, w, p, s = make_inputs(numel, c, dtype, label_dtype, feature, dev)
        case = f"{feature}/{reduction}/C={c}"
        print(f"[{k + 1}/{len(all_cases)}] {case} numel={numel} {dtype} labels={label_dtype}", flush=True)
        for name, fn in implementations(dev).items():
            check(name, fn, x, z, w, p, s, reduction)
            for pass_, (med, p20, p80, peak) in measure(fn, x, z, w, p, s, reduction, dev, reps).items():
                nbytes = bytes_min(x, z, w, p, reduction, pass_)
                gbps = nbytes / (med * 1e-3) / 1e9 if med > 0 else float("nan")
                rows.append(dict(
                    env, impl=name, case=case, dtype=str(dtype).replace("torch.", ""),
                    label_dtype=str(label_dtype).replace("torch.", ""), weight=w is not None,
                    pos_weight=p is not None, label_smoothing=s, reduction=reduction, numel=numel,
                    shape="x".join(map(str, x.shape)), **{"pass": pass_}, median_ms=med, p20_ms=p20, p80_ms=p80,
                    bytes_min=nbytes, gbps=gbps, pct_copy_bw=100 * gbps / copy_bw, peak_mem_bytes=peak,
                ))
    frame = pd.DataFrame(rows, columns=_bench.COLUMNS)
    out = args.out or _bench.results_csv("", dev, "-quick" if args.quick else "")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    frame.to_csv(out, index=False)
    print(f"wrote {len(frame)} rows to {out}")
    for path in report.build(out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
