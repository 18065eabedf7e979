"""Timing, environment and CSV helpers shared by the sweeps."""

import datetime
import os
import subprocess
import time

import torch

COLUMNS = [
    "device", "torch_version", "triton_version", "commit", "impl", "case", "dtype", "label_dtype",
    "weight", "pos_weight", "label_smoothing", "reduction", "numel", "shape", "pass",
    "median_ms", "p20_ms", "p80_ms", "bytes_min", "gbps", "pct_copy_bw", "peak_mem_bytes",
]
RESULTS = os.path.join(os.path.dirname(__file__), "results")
# GPU timing (time_ms). Below 1 ms a call's device time can be shorter than
# the host time of its launches (tens to hundreds of us per loss call), which
# CUDA events would then measure; a CUDA graph replay has no host gaps.
# Durations in ms: do_bench's `warmup` and `rep` are times to fill, not counts.
GRAPH_BELOW_MS = 1.0
GRAPH_REP_MS = 20
WARMUP_MS = 25
REP_MS = 100


def device(name: str | None = None) -> torch.device:
    """`name` (a sweep's --device), else the GPU where there is one."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({os.cpu_count()} cores, no GPU)"


def environment(dev: torch.device) -> dict:
    """The columns every row shares."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = ""
    return dict(device=device_name(dev), torch_version=torch.__version__, triton_version=triton_version,
                commit=commit)


def results_csv(prefix: str, dev: torch.device, suffix: str = "") -> str:
    """perf/results/<prefix><device>-<date><suffix>.csv: `cpu` or the GPU's name."""
    name = "cpu" if dev.type == "cpu" else device_name(dev).replace(" ", "_")
    os.makedirs(RESULTS, exist_ok=True)
    return os.path.join(RESULTS, f"{prefix}{name}-{datetime.date.today()}{suffix}.csv")


def time_ms(fn, dev: torch.device, reps: int) -> tuple[float, float, float]:
    """(median, p20, p80) in ms. On a GPU, a short estimate first: a call
    under `GRAPH_BELOW_MS` is timed as CUDA graph replays
    (do_bench_cudagraph), since between CUDA events do_bench would mostly
    measure the host's launch gaps; longer calls with do_bench (L2 flushed
    before every call). A graph replays calls back to back with no flush, so
    a working set smaller than the L2 (the 1M-element cases) is read from it,
    as a loss reads logits just written by the layer before it. `reps` counts
    the calls timed on the CPU (perf_counter); on a GPU the durations below
    are in ms, as do_bench's `warmup` and `rep` are."""
    if dev.type == "cuda":
        import triton.testing

        estimate = triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")
        if estimate < GRAPH_BELOW_MS:
            try:
                return tuple(triton.testing.do_bench_cudagraph(fn, rep=GRAPH_REP_MS, quantiles=[0.5, 0.2, 0.8]))
            except RuntimeError as err:
                print(f"CUDA graph capture failed ({err}); timing with do_bench instead")
        return tuple(triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, quantiles=[0.5, 0.2, 0.8]))
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = torch.tensor(times).quantile(torch.tensor([0.5, 0.2, 0.8])).tolist()
    return q[0], q[1], q[2]


def copy_bandwidth_gbps(dev: torch.device) -> float:
    """A large device-to-device copy, bytes read plus written per second."""
    n = (1 << 28) if dev.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    med, _, _ = time_ms(lambda: dst.copy_(src), dev, reps=20)
    return 2 * n / (med * 1e-3) / 1e9


def peak_memory(fn, dev: torch.device) -> int | None:
    """Peak bytes allocated above what was allocated before `fn` (CUDA's
    allocator statistics; the CPU allocator keeps none)."""
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(dev) - base
