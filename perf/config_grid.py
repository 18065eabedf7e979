"""`python -m perf.config_grid`: every forward launch config of a grid wider than configs/ timed on a GPU."""

import argparse
import contextlib
import hashlib
import itertools
import os
import time

import pandas as pd
import torch

import fused_sigxent as fs

from . import _bench
from .sweep_loss import bytes_min, make_inputs

# The loss's training forward (logits that require grad: the forward writes
# the gradient too), bf16 logits with uint8 labels, mean, C = 1000: the
# sweep's case where the plain loss read slower than the weighted one.
NUMEL = 1 << 26
CLASSES = 1000
FEATURES = ["plain", "weight", "pos_weight"]
# Warps start at 4: fewer would put more programs on an SM than the
# reduction's partial-sum slots hold (kernels/_grid.py MIN_WARPS). BLOCK stays
# at most 16384, which the int32 offsets' headroom assumes.
BLOCKS = [1024, 2048, 4096, 8192, 16384]
WARPS = [4, 8, 16]
STAGES = [1, 2, 3]
KERNEL = "sigmoid_ce_fwd"
COLUMNS = ["device", "torch_version", "triton_version", "commit", "source", "feature", "dtype", "label_dtype",
           "numel", "shape", "BLOCK", "num_warps", "num_stages", "in_configs", "median_ms", "p20_ms", "p80_ms",
           "bytes_min", "gbps", "pct_copy_bw", "n_regs", "n_spills", "per_sm", "occupancy", "programs", "ptx_md5",
           "same_code_as", "status"]


def configs_candidates(numel: int, elem_bytes: int) -> list[tuple[int, int, int]]:
    """(BLOCK, num_warps, num_stages) of configs/'s candidates for this size and element size."""
    from fused_sigxent.kernels import _configs

    found = _configs.candidates(KERNEL, _configs.numel_class(KERNEL, numel), elem_bytes)
    return [(c["BLOCK"], c["num_warps"], c.get("num_stages", 1)) for c in found]


def grid(numel: int, elem_bytes: int, limit: int | None = None) -> list[tuple[int, int, int]]:
    """The candidates in the order they are timed: configs/'s first (so a run
    cut short still compares them), then the rest with one stage, then
    configs/'s with more stages. More stages last and for those alone: a
    pipeliner only acts on a loop's loads that feed a dot, and this loop has
    none (the PTX of 1, 2 and 3 stages was the same, Triton 3.9 for sm_90);
    a candidate whose code is the same as one timed is not timed again."""
    first = configs_candidates(numel, elem_bytes)
    one_stage = [(b, w, 1) for b, w in itertools.product(BLOCKS, WARPS) if (b, w, 1) not in first]
    staged = [(b, w, s) for s in STAGES[1:] for b, w, _ in first if (b, w, s) not in first]
    return (first + one_stage + staged)[:limit]


def _kernel():
    from fused_sigxent.kernels import sigmoid_ce_fwd

    return sigmoid_ce_fwd._sigmoid_ce_fwd_kernel


@contextlib.contextmanager
def only(candidate):
    """The forward kernel tuned over `candidate` alone (None: configs/'s own),
    with no config or launch plan kept from before, nor left behind."""
    from fused_sigxent.core.plans import PLANS
    from fused_sigxent.kernels import _configs

    kernel = _kernel()
    saved = kernel.candidates
    if candidate is not None:
        block, warps, stages = candidate
        options = _configs.launch_options({"BLOCK": block, "num_warps": warps, "num_stages": stages})
        kernel.candidates = lambda size_class, elem_bytes: [dict(options)]
    kernel.cache.clear()
    PLANS.clear()
    try:
        yield kernel
    finally:
        kernel.candidates = saved
        kernel.cache.clear()
        PLANS.clear()


def compiled_figures(kernel, dev, numel: int) -> dict:
    """What the tuner compiled and chose for the one variant run since `only`
    began: the config, registers, spills, programs per SM, occupancy and grid."""
    from fused_sigxent.kernels import _grid, _launch

    (choice,) = kernel.cache.values()
    options = choice.options
    figures = dict(BLOCK=options["BLOCK"], num_warps=options["num_warps"], num_stages=options.get("num_stages", 1),
                   n_spills=choice.spills, per_sm=choice.per_sm, occupancy=choice.occupancy)
    compiled = [launch.compiled for name, launch in _launch.launches() if name == KERNEL and launch.compiled is not None]
    if compiled:
        figures["n_regs"] = getattr(compiled[0], "n_regs", None)
        ptx = getattr(compiled[0], "asm", {}).get("ptx")
        if ptx:
            figures["ptx_md5"] = hashlib.md5(ptx.encode()).hexdigest()
    if dev.type == "cuda":
        figures["programs"] = _grid.persistent_grid(numel, dev).resolve(options["BLOCK"], choice.per_sm)[0]
    return figures


def summary(frame: pd.DataFrame) -> str:
    """The tuner's picks, each feature's fastest configs, and every config's
    time per feature side by side."""
    head = frame.iloc[0]
    lines = [f"# Forward launch configs on {head['device']}", "",
             f"torch {head['torch_version']}, triton {head['triton_version']}, commit {head['commit']}; "
             f"the training forward (loss and gradient in one launch) at {head['numel']} elements "
             f"({head['shape']}), {head['dtype']} logits, {head['label_dtype']} labels, mean. Times: CUDA graph "
             "replays, median ms; bytes: inputs read and the gradient written once. `in_configs`: a candidate "
             "configs/ offers at this size.", ""]
    ok = frame[frame["status"] == "ok"]
    tuner = ok[ok["source"] == "tuner"]
    if len(tuner):
        lines += ["## What the tuner picks from configs/", "",
                  tuner[["feature", "BLOCK", "num_warps", "num_stages", "median_ms", "pct_copy_bw", "n_regs",
                         "occupancy"]].to_markdown(index=False, floatfmt=".3f"), ""]
    grid_rows = ok[ok["source"] == "grid"]
    if len(grid_rows):
        lines += ["## Fastest configs per feature", "", "(Candidates with the same code as one listed are left out: "
                  "`same_code_as` in the CSV.)", ""]
        for feature, part in grid_rows[grid_rows["same_code_as"].isna()].groupby("feature", sort=False):
            best = part.nsmallest(5, "median_ms")
            lines += [f"**{feature}**", "", best[["BLOCK", "num_warps", "num_stages", "in_configs", "median_ms",
                                                  "pct_copy_bw", "n_regs", "n_spills", "occupancy", "programs"]]
                      .to_markdown(index=False, floatfmt=".3f"), ""]
        table = grid_rows.pivot_table(index=["BLOCK", "num_warps", "num_stages"], columns="feature",
                                      values="median_ms", aggfunc="first")
        regs = grid_rows.pivot_table(index=["BLOCK", "num_warps", "num_stages"], columns="feature",
                                     values="n_regs", aggfunc="first")
        table = table.join(regs.add_suffix(" regs"))
        lines += ["## Every config, median ms (and registers) per feature", "",
                  table.reset_index().to_markdown(index=False, floatfmt=".4g"), ""]
    failed = frame[frame["status"] != "ok"]
    if len(failed):
        lines += ["## Not run", "", failed[["source", "feature", "BLOCK", "num_warps", "num_stages", "status"]]
                  .to_markdown(index=False), ""]
    return "\n".join(lines)


def parser():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu with --stand-in")
    parser.add_argument("--numel", type=int, default=NUMEL)
    parser.add_argument("--limit", type=int, default=None, help="time only the first N candidates of the grid")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds: start no candidate after this "
                        "long (the CSV is rewritten after every measurement)")
    parser.add_argument("--stand-in", action="store_true", help="no GPU: compile for a stand-in sm_90 and launch "
                        "nothing (perf.host_overhead's), to check this script runs; its times mean nothing")
    parser.add_argument("--out", default=None, help="CSV path (default perf/results/config_grid-<device>-<date>.csv)")
    parser.add_argument("--dry-run", action="store_true", help="list the candidates and exit")
    return parser


def main(argv=None):
    started = time.perf_counter()
    args = parser().parse_args(argv)
    candidates = grid(args.numel, torch.bfloat16.itemsize, args.limit)
    if args.dry_run:
        print("\n".join(f"BLOCK={b} num_warps={w} num_stages={s} x {','.join(FEATURES)}" for b, w, s in candidates))
        return
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here (--device cpu --stand-in checks the script without one)")
    if dev.type != "cuda" and not args.stand_in:
        raise SystemExit("launch configs need a GPU: --device cuda, or --stand-in to check the script")
    env = _bench.environment(dev)
    out = args.out or _bench.results_csv("config_grid-", dev)
    if args.stand_in:
        from .host_overhead import stubbed_launches

        context = stubbed_launches("triton")
    else:
        context = contextlib.nullcontext()
    rows = []
    timed = {}  # (feature, PTX hash) -> (the candidate timed with that code, its times)

    def write():
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        pd.DataFrame(rows, columns=COLUMNS).to_csv(out, index=False)

    with context:
        copy_bw = _bench.copy_bandwidth_gbps(dev)
        classes = min(CLASSES, args.numel)
        inputs = {f: make_inputs(args.numel, classes, torch.bfloat16, torch.uint8, f, dev) for f in FEATURES}
        first = configs_candidates(args.numel, torch.bfloat16.itemsize)
        print(f"{len(candidates)} candidates x {len(FEATURES)} features at {args.numel} elements on {env['device']}; "
              f"copy bandwidth {copy_bw:.0f} GB/s", flush=True)
        # The tuner's own pick first, then every candidate alone.
        for source, candidate in [("tuner", None)] + [("grid", c) for c in candidates]:
            if args.time_limit is not None and time.perf_counter() - started > args.time_limit:
                print(f"time limit ({args.time_limit:.0f} s) reached", flush=True)
                break
            for feature in FEATURES:
                x, z, w, p, _ = inputs[feature]
                xg = x.detach().requires_grad_()
                block, warps, stages = candidate or (None, None, None)
                row = dict(env, source=source, feature=feature, dtype="bfloat16", label_dtype="uint8",
                           numel=args.numel, shape="x".join(map(str, x.shape)), BLOCK=block, num_warps=warps,
                           num_stages=stages, bytes_min=bytes_min(x, z, w, p, "mean", "fwd+bwd"))

                def forward():
                    return fs.binary_cross_entropy_with_logits(xg, z, w, pos_weight=p)

                try:
                    with only(candidate) as kernel:
                        forward()  # compiles (and for the tuner's pick, times) before any capture
                        figures = compiled_figures(kernel, dev, args.numel)
                        twin = timed.get((feature, figures.get("ptx_md5")))
                        if twin is None or source == "tuner":
                            med, p20, p80 = _bench.time_ms(forward, dev, reps=100)
                        else:  # the same code as a candidate timed already: its times
                            figures["same_code_as"] = twin[0]
                            med, p20, p80 = twin[1]
                    if figures.get("ptx_md5") and source == "grid":
                        timed.setdefault((feature, figures["ptx_md5"]), (
                            f"BLOCK={figures['BLOCK']} warps={figures['num_warps']} stages={figures['num_stages']}",
                            (med, p20, p80)))
                    gbps = row["bytes_min"] / (med * 1e-3) / 1e9
                    row.update(figures, median_ms=med, p20_ms=p20, p80_ms=p80, gbps=gbps,
                               pct_copy_bw=100 * gbps / copy_bw, status="ok")
                    row["in_configs"] = (row["BLOCK"], row["num_warps"], row["num_stages"]) in first
                    print(f"{source:5} {feature:10} BLOCK={row['BLOCK']:5} warps={row['num_warps']:2} "
                          f"stages={row['num_stages']} {med:.4f} ms {row['pct_copy_bw']:.0f}% of copy "
                          f"regs={row.get('n_regs')} occupancy={row['occupancy']}"
                          + (f" (same code as {row['same_code_as']})" if row.get("same_code_as") else ""), flush=True)
                except Exception as err:  # a config that does not compile or fit: recorded, the rest go on
                    row["status"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                    print(f"{source:5} {feature:10} {candidate}: {row['status']}", flush=True)
                rows.append(row)
                write()
    write()
    frame = pd.DataFrame(rows, columns=COLUMNS)
    md = os.path.splitext(out)[0] + ".md"
    if len(frame):
        with open(md, "w") as f:
            f.write(summary(frame))
    print(f"wrote {out} and {md}; took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
