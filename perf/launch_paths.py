"""`python -m perf.launch_paths`: host time of one forward launch by each way
the package could launch it: its launch plan's direct launch, the tuner's
JITFunction.run path, and Triton's stock `triton.autotune` over the same
candidates; one tidy CSV row per way (what docs/design.md cites for keeping
the tuner and launch plans by hand).

Without a GPU, against `host_overhead`'s stand-in sm_90 driver: the kernels
compile for sm_90 and launch as no-ops, so the time is the host's alone."""

import argparse
import datetime
import json
import os

import pandas as pd
import torch
import triton

from . import _bench
from .host_overhead import COLUMNS, per_call_us, stubbed_launches

SHAPE = (8, 16)


def _captured_launch():
    """(Launch, tensors) of a pos_weight bf16 forward's launch plan."""
    from fused_sigxent.core import reduction as R
    from fused_sigxent.kernels import _launch, sigmoid_ce_fwd

    x = torch.randn(SHAPE, dtype=torch.bfloat16)
    z = (torch.rand(SHAPE) > 0.5).to(torch.bfloat16)
    p = torch.rand(SHAPE[1], dtype=torch.bfloat16)
    s = torch.zeros(())
    seen = []
    call = _launch.Launch.__call__
    _launch.Launch.__call__ = lambda self, *tensors: seen.append((self, tensors)) or call(self, *tensors)
    try:
        sigmoid_ce_fwd.sigmoid_ce_fwd(x, z, None, p, s, R.TORCH_MEAN, torch.bfloat16, True, False)
    finally:
        _launch.Launch.__call__ = call
    return seen[0]


def ways():
    """{way: a function that launches the forward once}."""
    launch, tensors = _captured_launch()
    tuned = launch.kernel
    args = (*tensors, *launch.scalars)
    launch(*tensors)  # the direct launch is set up on the plan's second call
    assert launch.direct is not None, "the launch plan did not go direct"

    def through_tuner():
        grid, kwargs = tuned.prepare(args, launch.constexprs, launch.grid)
        tuned.fn.run(*args, grid=grid, warmup=False, **kwargs)

    # Triton's stock autotuner over the same candidates, keyed as ours is
    # (numel class, dtypes by its own key), with a grid from BLOCK alone: it
    # cannot size a persistent grid by each compiled candidate's occupancy.
    configs = [triton.Config({k: v for k, v in o.items() if k not in ("num_warps", "num_stages", "enable_fp_fusion")},
                             num_warps=o["num_warps"], num_stages=o["num_stages"])
               for o in tuned.candidates(tuned.key(args, launch.constexprs)[1], tensors[0].element_size())]
    stock = triton.autotune(configs, key=["numel_class"], do_bench=lambda fn, **_: 1.0)(tuned.fn)
    n, slots = tensors[0].numel(), launch.constexprs["MAX_PROGRAMS"]

    def grid(meta):
        return (max(1, min(-(-n // meta["BLOCK"]), slots)),)

    constexprs = {**launch.constexprs, "enable_fp_fusion": True}

    def through_stock_autotune():
        stock[grid](*args, **constexprs)

    return {"launch_plan": lambda: launch(*tensors), "tuner_jit_run": through_tuner,
            "triton_autotune": through_stock_autotune}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET: the kernels must be decorated as for a GPU")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    env = _bench.environment(torch.device("cpu"))
    rows = []
    with stubbed_launches("triton"):
        for way, fn in ways().items():
            p50, p20, p80 = per_call_us(fn, args.repeat, args.rounds)
            rows.append(dict(op="sigmoid_ce_fwd/pos_weight", provider=way, mode="launch", dtype="bfloat16",
                             n_rows=SHAPE[0], n_cols=SHAPE[1], metric="host_time", unit="us", p50=p50, p20=p20,
                             p80=p80, device_name=env["device"],
                             timestamp=datetime.datetime.now().isoformat(timespec="seconds"),
                             package_version=f"torch {env['torch_version']}, triton {env['triton_version']}",
                             config=json.dumps({"commit": env["commit"], "driver": "stand-in sm_90"})))
            print(f"{way:16s} {p50:7.2f} us  (p20 {p20:.2f}, p80 {p80:.2f})", flush=True)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    _bench.save_csv(frame, "launch_paths-", torch.device("cpu"), args.out)
    return frame


if __name__ == "__main__":
    main()
