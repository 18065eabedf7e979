"""Peak memory above the inputs during a pass: CUDA's allocator statistics on a
GPU; on the CPU, peak resident memory (VmHWM) in a fresh process per case.

The CPU allocator keeps no statistics, so a pass's peak is read from Linux:
writing "5" to /proc/self/clear_refs resets VmHWM (the process's resident
high-water mark) to the current VmRSS, so VmHWM - VmRSS-before, read after the
pass, is the most memory the pass held at once above what was already
resident. Two conditions make that the allocator's real holding:
- a fresh process per case (`run_children`), so nothing a previous case freed
  into malloc's free lists is reused and hidden from RSS;
- MALLOC_MMAP_THRESHOLD_=131072 in that process (`CHILD_ENV`): glibc serves
  every block of 128 KiB or more with its own mmap and unmaps it on free, so a
  freed temporary leaves RSS at once and the next one is counted again (by
  default glibc raises that threshold up to 32 MiB as blocks are freed, and
  then reuses freed heap that RSS still counts).
Resolution: pages (4 KiB), plus the interpreter's own small allocations
(tens of KiB); a few hundred KiB is noise.

A child is `python -m perf._memory MODULE JSON`: it calls
`perf.MODULE.memory_child(**json)` (this module's own: a known allocation), which returns a dict of peaks (measured
with `pass_peaks` or `rss_peak`), and prints it as one JSON line.
"""

import concurrent.futures
import gc
import json
import os
import re
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
CHILD_TIMEOUT_S = 600


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1)) * 1024


def rss_available() -> bool:
    """Whether this kernel lets a process reset its VmHWM (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_bytes("VmHWM")
        return True
    except (OSError, AttributeError):
        return False


def rss_peak(fn) -> int:
    """Peak resident bytes above the resident bytes before `fn()`, in this
    process (meaningful in a child started with CHILD_ENV; see above)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    fn()
    return max(0, _status_bytes("VmHWM") - base)


def cuda_peak(fn, dev: torch.device) -> int:
    """Peak bytes allocated above what was allocated before `fn()`."""
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) - base


def pass_peaks(forward, backward, reset, dev: torch.device) -> dict:
    """{pass: peak bytes above the inputs} of a loss: `forward()` returns a
    loss with its graph, `backward(loss)` runs its backward, `reset()` drops
    the gradients a backward left (untimed, unmeasured, before each pass).
    After one warm-up step (compilation, first-call caches, thread pools):
      fwd:     the forward, keeping its result and graph (what a training
               forward leaves for the backward is part of its peak);
      bwd:     the backward of that graph, above the graph it starts from
               (the gradients it writes are part of its peak);
      fwd+bwd: both, from the inputs alone.
    On the CPU each is the median of three measurements."""
    peak = (lambda fn: cuda_peak(fn, dev)) if dev.type == "cuda" else rss_peak
    backward(forward())
    reset()
    samples = {"fwd": [], "bwd": [], "fwd+bwd": []}
    # RSS moves by pages and by what the interpreter allocates alongside (the
    # same forward of a 64K-element case read 233 to 434 KiB in one sweep):
    # the median of three. CUDA's counts are exact; one is enough.
    for _ in range(3 if dev.type != "cuda" else 1):
        held = []
        samples["fwd"].append(peak(lambda: held.append(forward())))
        samples["bwd"].append(peak(lambda: backward(held.pop())))
        reset()
        samples["fwd+bwd"].append(peak(lambda: backward(forward())))
        reset()
    return {pass_: sorted(values)[len(values) // 2] for pass_, values in samples.items()}


def memory_child(allocate_mib=0):
    """A known allocation, to check the measurement itself (tests/tooling/test_perf.py):
    the peak of allocating and writing `allocate_mib` MiB, then freeing it."""
    return {"peak": rss_peak(lambda: torch.ones(allocate_mib << 18) if allocate_mib else None)}


def child_command(module: str, spec: dict, entry: str = "memory_child") -> list[str]:
    return [sys.executable, "-m", "perf._memory", module, json.dumps(spec), entry]


def run_child(module: str, spec: dict, entry: str = "memory_child", env: dict | None = None) -> dict:
    """`perf.MODULE.<entry>(**spec)` in a fresh process with `env` added to
    this one's (default CHILD_ENV); its dict, or {} (and a printed reason) if
    the child failed. `entry` "case_child": a sweep's peaks and timing, which
    must not inherit the allocator the parent's earlier cases left
    (`perf/_bench.py`)."""
    env = dict(os.environ, **(CHILD_ENV if env is None else env))
    try:
        done = subprocess.run(child_command(module, spec, entry), cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"child {module}.{entry} {spec} timed out")
        return {}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"child {module}.{entry} {spec} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return {}
    return json.loads(lines[-1])


def run_children(module: str, specs: list[dict], workers: int | None = None) -> list[dict]:
    """`run_child` for each spec, `workers` at a time (default: the cores,
    at most 2: memory is not timing, so children may share the machine, but
    each one's peak is its own)."""
    workers = workers or min(2, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda spec: run_child(module, spec), specs))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    module, spec = argv[0], json.loads(argv[1])
    entry = argv[2] if len(argv) > 2 else "memory_child"
    import importlib

    result = getattr(importlib.import_module(f"perf.{module}"), entry)(**spec)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
