"""Runs a function on W ranks: fresh processes on 127.0.0.1 joined in a gloo
process group, each with a timeout, so a hang fails (a test, a sweep)
instead of stalling it. The distributed sweeps and tests share it."""

import datetime
import importlib
import multiprocessing
import os
import socket
import tempfile
import traceback

import torch

# Per process: start-up (torch and the package import), the group, the work.
TIMEOUT_S = 120
# The group's own timeout: a collective whose peer failed raises after it.
GROUP_TIMEOUT_S = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, module, name, args, out):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch.distributed as dist

    result = None
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        torch.manual_seed(0)
        fn = getattr(importlib.import_module(module), name)
        result = ("ok", fn(rank, world, *args))
    except BaseException:  # reported to the test, which fails naming the rank
        result = ("error", traceback.format_exc())
    finally:
        torch.save(result, out)
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def run_ranks(world: int, module: str, name: str, *args, env: dict | None = None) -> list:
    """`module.name(rank, world, *args)` on each of `world` ranks; every
    rank's result, in rank order. Raises, naming the rank, where a rank
    raised or did not finish within TIMEOUT_S (then killed)."""
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with tempfile.TemporaryDirectory() as folder:
            outs = [os.path.join(folder, f"rank{r}.pt") for r in range(world)]
            procs = [context.Process(target=_entry, args=(r, world, port, module, name, args, outs[r]))
                     for r in range(world)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(TIMEOUT_S)
            hung = [r for r, p in enumerate(procs) if p.is_alive()]
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
            if hung:
                raise AssertionError(f"ranks {hung} did not finish within {TIMEOUT_S} s (killed)")
            results = [torch.load(out, weights_only=False) if os.path.exists(out) else ("error", "no result")
                       for out in outs]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    errors = [f"rank {r}:\n{value}" for r, (status, value) in enumerate(results) if status != "ok"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [value for _, value in results]


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def time_and_peak(step, steps: int = 1, barrier: bool = False) -> tuple[float, int]:
    """(median seconds of `steps` calls of `step`, resident bytes above the
    current at their peak) in this process: one warm call first (builds,
    pools), then the peak reset (5 written to /proc/self/clear_refs). With
    `barrier`, every rank of the default group starts the measured calls
    together. Meant for fresh processes with MALLOC_MMAP_THRESHOLD_ set, so
    freed buffers leave the resident set."""
    import statistics
    import time

    import torch.distributed as dist

    step()
    if barrier:
        dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), _status("VmHWM") - before
