"""Timing, environment and CSV helpers shared by the sweeps."""

import ctypes
import datetime
import functools
import math
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
    # PERF_COMMIT names the commit where the checkout's .git cannot (a copy
    # of the working tree whose .git is another commit's).
    commit = os.environ.get("PERF_COMMIT", "")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        pass
    return dict(device=device_name(dev), torch_version=torch.__version__, triton_version=triton_version,
                commit=commit)


def results_csv(prefix: str, dev: torch.device, suffix: str = "") -> str:
    """perf/results/<prefix><device>-<date><suffix>.csv: `cpu` or the GPU's name."""
    name = "cpu" if dev.type == "cpu" else device_name(dev).replace(" ", "_")
    os.makedirs(RESULTS, exist_ok=True)
    return os.path.join(RESULTS, f"{prefix}{name}-{datetime.date.today()}{suffix}.csv")


def save_csv(frame, prefix: str, dev: torch.device, out: str | None = None) -> str:
    """Writes `frame` to `out`, or to `results_csv(prefix, dev)`; says where."""
    out = out or results_csv(prefix, dev)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    frame.to_csv(out, index=False)
    print(f"wrote {len(frame)} rows to {out}")
    return out


# CPU timing (and any timing with a per-call `setup`): a sample is one
# perf_counter interval around a loop of k calls, k chosen so the interval
# lasts at least MIN_SAMPLE_MS (perf_counter's resolution and the loop's own
# overhead are then under 0.1% of it), reported per call. Samples are taken
# until SAMPLE_BUDGET_MS of calls, at least MIN_SAMPLES and at most `reps`,
# so a 0.05 ms call gets `reps` samples and a 500 ms call MIN_SAMPLES.
MIN_SAMPLE_MS = 2.0
MIN_SAMPLES = 5
SAMPLE_BUDGET_MS = 1000.0


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _loop_ms(fn, setup, k: int, dev: torch.device) -> float:
    """Per-call ms of k calls timed as one interval; with `setup`, k states
    are made first, untimed, and each call gets its own."""
    states = [setup() for _ in range(k)] if setup is not None else None
    _sync(dev)
    start = time.perf_counter()
    if states is None:
        for _ in range(k):
            fn()
    else:
        for state in states:
            fn(state)
    _sync(dev)
    elapsed = (time.perf_counter() - start) * 1e3
    del states
    return elapsed / k


@functools.cache
def settle_allocator() -> None:
    """glibc's allocator put in the state a long-running process reaches, where
    the C library is glibc: mmap threshold 32 MiB, trim threshold 64 MiB.

    glibc starts at 128 KiB and raises the threshold (up to 32 MiB, the trim
    threshold to twice that) whenever a block above it is freed; from then on
    blocks below it come from freed heap, with no page faults. When that
    happens depends on what the process allocated before, so implementations
    timed one after another got different allocators: in one sweep
    torch.compile's 16M-element bf16 backward took 4.7 ms after eager ran,
    10 ms in a fresh process. Settled first, every implementation is timed
    against the same allocator, the one a training loop has after its first
    step (blocks over 32 MiB are mapped afresh every call, as ever)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 64 << 20)


def time_loop_ms(fn, dev: torch.device, reps: int, setup=None) -> tuple[float, float, float]:
    """(median, p20, p80) per-call ms of `fn()`, or of `fn(setup())` with each
    call's `setup()` made untimed (a backward needs a fresh graph per call).
    Wall-clock time, host and device: what the caller waits for. The
    allocator's state is settled first (`settle_allocator`)."""
    settle_allocator()
    _loop_ms(fn, setup, 1, dev)  # warm-up: first-call costs (compilation, caches)
    estimate = _loop_ms(fn, setup, 1, dev)
    k = max(1, math.ceil(MIN_SAMPLE_MS / max(estimate, 1e-4)))
    if k > 1:  # one call is too noisy to size the loop from: refine
        estimate = _loop_ms(fn, setup, k, dev)
        k = max(1, math.ceil(MIN_SAMPLE_MS / max(estimate, 1e-4)))
    samples = min(reps, max(MIN_SAMPLES, math.ceil(SAMPLE_BUDGET_MS / (k * estimate))))
    times = [_loop_ms(fn, setup, k, dev) for _ in range(samples)]
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return q[0], q[1], q[2]


def time_ms(fn, dev: torch.device, reps: int, setup=None) -> tuple[float, float, float]:
    """(median, p20, p80) in ms per call. On a GPU without `setup`, the call
    is captured in a CUDA graph and replayed (do_bench_cudagraph): device
    time, with no host launch gaps between CUDA events. Where that device
    time reaches `GRAPH_BELOW_MS` the call is timed again with do_bench (L2
    flushed before every call): a graph replays calls back to back with no
    flush, so a working set smaller than the L2 (the 1M-element cases) is
    read from it, as a loss reads logits just written by the layer before
    it. The switch is on device time: one on wall time (do_bench's) put a
    call whose host took a millisecond among the long ones, and timed its
    host. Host time per call is perf.host_overhead's measurement.
    On the CPU, or with `setup` (a backward: autograd cannot be replayed in a
    graph), `time_loop_ms`; `reps` caps its samples."""
    if dev.type == "cuda" and setup is None:
        import triton.testing

        try:
            timed = tuple(triton.testing.do_bench_cudagraph(fn, rep=GRAPH_REP_MS, quantiles=[0.5, 0.2, 0.8]))
            if timed[0] < GRAPH_BELOW_MS:
                return timed
        except RuntimeError as err:
            print(f"CUDA graph capture failed ({err}); timing with do_bench instead")
        return tuple(triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, quantiles=[0.5, 0.2, 0.8]))
    return time_loop_ms(fn, dev, reps, setup)


def copy_bandwidth_gbps(dev: torch.device) -> float:
    """A large device-to-device copy, bytes read plus written per second."""
    n = (1 << 28) if dev.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    med, _, _ = time_ms(lambda: dst.copy_(src), dev, reps=20)
    return 2 * n / (med * 1e-3) / 1e9
