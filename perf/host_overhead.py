"""`python -m perf.host_overhead`: host time per loss call (fwd, fwd+bwd) of
fused_sigxent's CUDA path, against PyTorch eager's whole call and the floor
of any Python autograd.Function, on tiny tensors; one tidy CSV row per
measurement.

Without a GPU (the default, `--device cpu`) our CUDA path runs on CPU
tensors with nothing run on a device (see `stubbed_launches`). With
`--device cuda` every call launches for real on tiny CUDA tensors: the
kernels then take a few microseconds, so calls queue faster than the GPU
drains them only if the host is the slower side, and the time per call is
the host's."""

import argparse
import contextlib
import cProfile
import datetime
import json
import os
import pstats
import time
import types

import pandas as pd
import torch
import torch.nn.functional as F

from . import _bench

# Tiny on purpose: PyTorch eager's time is then its host path (dispatch,
# autograd, allocation), not arithmetic, and ours does no arithmetic at all.
SHAPE = (8, 16)
CASES = {
    "plain": dict(weight=False, pos_weight=False, label_smoothing=0.0),
    "pos_weight": dict(weight=False, pos_weight=True, label_smoothing=0.0),
    "both+smoothing": dict(weight=True, pos_weight=True, label_smoothing=0.1),
}
DTYPES = [torch.bfloat16, torch.float32]
COLUMNS = ["op", "provider", "mode", "dtype", "n_rows", "n_cols", "metric", "unit", "p50", "p20", "p80",
           "device_name", "timestamp", "package_version", "config"]


class _NotRun:
    """What a stubbed compile returns: the figures the tuner reads from a
    compiled kernel (a small kernel with no shared memory)."""

    n_regs, n_spills = 32, 0

    def __init__(self, num_warps):
        self.metadata = types.SimpleNamespace(num_warps=num_warps, shared=0)

    def _init_handles(self):
        pass


def _stub_run(self, *args, grid, warmup, **kwargs):
    """JITFunction.run without Triton's binder or a launch: a compile returns
    `_NotRun`; a launch only evaluates its grid, as Triton would."""
    if warmup:
        return _NotRun(kwargs.get("num_warps", 4))
    if callable(grid):
        grid(dict(zip(self.arg_names, args), **kwargs))
    return None


class _StandInDriver:
    """Triton's driver interface for an sm_90 GPU that is not there: kernels
    compile for it (Triton ships ptxas), load as nothing, launch as no-ops."""

    class utils:
        @staticmethod
        def load_binary(name, kernel, shared, device):
            # module, function, registers, spills, max threads. A module that
            # is not None: Triton reloads a kernel whose module is None on
            # every launch, which a real driver never makes it do.
            return object(), None, 32, 0, 1024

        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

        @staticmethod
        def unload_module(module):
            pass

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def launcher_cls(self, src, metadata):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stubbed_launches(launch: str):
    """The Python path of a CUDA call (op, autograd, launcher, layout, config
    choice and grid) on CPU tensors, nothing run on a device. launch="triton":
    Triton's own launch path (argument binding, specialization, kernel cache)
    against `_StandInDriver`, the kernels compiled for sm_90 on first use;
    launch="stub": JITFunction.run replaced by a no-op, our code alone. The
    tuner's timing is a no-op either way. Needs TRITON_INTERPRET unset, so the
    kernels are decorated as for a GPU."""
    import triton
    from triton.runtime.driver import driver

    from fused_sigxent.core import backend as _backend
    from fused_sigxent.kernels import _launch, _tuner

    saved = (triton.runtime.jit.JITFunction.run, _backend.use_kernels, _tuner.time_ms)
    saved_lookup = _tuner.Tuned.lookup
    # The driver in use before (None on a machine with no GPU, where Triton
    # finds none: reset_active() would raise there).
    saved_driver = driver._active
    if launch == "stub":
        triton.runtime.jit.JITFunction.run = _stub_run
        # Nothing is compiled, so there is nothing to launch directly.
        _tuner.Tuned.lookup = lambda self, args, kwargs: None
    else:
        driver.set_active(_StandInDriver())
    _backend.use_kernels = lambda device: True
    _tuner.time_ms = lambda call: 1.0
    # Launch plans hold the kernels (and the stream getter) of the driver
    # they were made with: none made before is used here, none made here after.
    _launch.PLANS.clear()
    try:
        yield
    finally:
        triton.runtime.jit.JITFunction.run, _backend.use_kernels, _tuner.time_ms = saved
        _tuner.Tuned.lookup = saved_lookup
        driver._active = saved_driver
        _launch.PLANS.clear()


def make_case(feature, dtype, device="cpu"):
    f = CASES[feature]
    x = torch.randn(SHAPE, dtype=dtype).to(device).requires_grad_()
    z = (torch.rand(SHAPE) > 0.5).to(dtype).to(device)
    w = torch.rand(SHAPE[1], dtype=dtype).to(device) if f["weight"] else None
    p = (torch.rand(SHAPE[1]) * 3).to(dtype).to(device) if f["pos_weight"] else None
    return x, z, w, p, f["label_smoothing"]


class _Floor(torch.autograd.Function):
    """The least a loss written as a Python autograd.Function can cost: a
    forward that only allocates its loss and gradient, a backward that only
    hands that gradient back, applied as ours is (C++ apply, no Python
    prelude). No validation, no computation, no launch."""

    @staticmethod
    def forward(x):
        return x.new_zeros(()), torch.empty_like(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.grad = output[1]

    @staticmethod
    def backward(ctx, grad, _):
        return ctx.grad


_floor_apply = super(torch.autograd.Function, _Floor).apply


def calls(x, z, w, p, s):
    """{provider: loss function}: ours (the same front end a user calls),
    PyTorch eager (smoothing as its own op, since PyTorch has none), and
    the floor of any Python autograd.Function (`_Floor`)."""
    import fused_sigxent as fs

    def ours():
        return fs.binary_cross_entropy_with_logits(x, z, w, pos_weight=p, label_smoothing=s)

    def eager():
        target = z * (1 - s) + 0.5 * s if s else z
        return F.binary_cross_entropy_with_logits(x, target, w, pos_weight=p)

    def floor():
        return _floor_apply(x)[0]

    return {"fused_sigxent": ours, "torch_eager": eager, "python_function_floor": floor}


def step(loss_fn, x, mode):
    def run():
        x.grad = None
        loss = loss_fn()
        if mode == "fwd+bwd":
            loss.backward()
    return run


def per_call_us(fn, repeat: int, rounds: int, sync=lambda: None) -> tuple[float, float, float]:
    """(median, p20, p80) over `rounds` of the mean time of `repeat` calls, in µs,
    each round ended by `sync` (the device's queue drained)."""
    fn()
    sync()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / repeat * 1e6)
    q = torch.tensor(samples, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(q.tolist())


SORT = "tottime"


def profile(fn, repeat: int, top: int):
    """cProfile of `repeat` calls: the functions that take the most time."""
    fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(repeat):
        fn()
    prof.disable()
    pstats.Stats(prof).sort_stats(SORT).print_stats(top)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one case (pos_weight, bfloat16), for a smoke test")
    parser.add_argument("--repeat", type=int, default=200, help="calls per timing round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=None, help="CSV path (default perf/results/host_overhead-cpu-<date>.csv)")
    parser.add_argument("--launch", choices=["triton", "stub"], default="triton",
                        help="triton: Triton's launch path against a stand-in sm_90 driver (compiles on first use); "
                        "stub: Triton's launch replaced by a no-op")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of our fwd+bwd (pos_weight, bf16)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: our CUDA path on CPU tensors, launches as --launch says; "
                        "cuda: real launches on CUDA tensors (--launch is ignored)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET: the kernels must be decorated as for a GPU")
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.manual_seed(0)
    # One thread: a tiny call has nothing to split, and idle intra-op threads
    # spinning against other processes (2 shared cores here) add milliseconds.
    torch.set_num_threads(1)
    device = torch.device(args.device)
    env = _bench.environment(device)
    launch = "cuda" if gpu else args.launch
    print(f"host time per call, {SHAPE[0]}x{SHAPE[1]} {args.device.upper()} tensors, {env['device']}; "
          "fused_sigxent's launches: " + {"cuda": "real", "triton": "Triton's launch path, stand-in sm_90 driver",
                                         "stub": "stubbed"}[launch])
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    rows = []
    with contextlib.nullcontext() if gpu else stubbed_launches(args.launch):
        if args.profile:
            x, z, w, p, s = make_case("pos_weight", torch.bfloat16, device)
            profile(step(calls(x, z, w, p, s)["fused_sigxent"], x, "fwd+bwd"), args.repeat, 30)
        for feature in ["pos_weight"] if args.quick else CASES:
            for dtype in DTYPES[:1] if args.quick else DTYPES:
                x, z, w, p, s = make_case(feature, dtype, device)
                for provider, fn in calls(x, z, w, p, s).items():
                    for mode in ["fwd", "fwd+bwd"]:
                        p50, p20, p80 = per_call_us(step(fn, x, mode), args.repeat, args.rounds, sync)
                        rows.append(dict(
                            op=f"bce_with_logits/{feature}", provider=provider, mode=mode,
                            dtype=str(dtype).replace("torch.", ""), n_rows=SHAPE[0], n_cols=SHAPE[1],
                            metric="host_time", unit="us", p50=p50, p20=p20, p80=p80, device_name=env["device"],
                            timestamp=datetime.datetime.now().isoformat(timespec="seconds"),
                            package_version=f"torch {env['torch_version']}, triton {env['triton_version']}",
                            config=json.dumps({"commit": env["commit"], "launch": launch})))
                        print(f"{feature:15s} {rows[-1]['dtype']:9s} {mode:8s} {provider:14s} "
                              f"{p50:8.1f} us  (p20 {p20:.1f}, p80 {p80:.1f})", flush=True)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    times = frame.pivot_table(index=["op", "dtype", "mode"], columns="provider", values="p50")
    for provider, name in (("fused_sigxent", "ours"), ("python_function_floor", "floor")):
        ratio = (times[provider] / times["torch_eager"]).groupby("mode").median()
        for mode, r in ratio.items():
            print(f"median {name} / eager host time, {mode}: {r:.2f}")
    _bench.save_csv(frame, "host_overhead-", device, args.out)
    return frame


if __name__ == "__main__":
    main()
