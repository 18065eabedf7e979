"""`python -m perf`: the loss, focal loss, and fused linear + SigLIP sweeps, each with its CSV, page and plots."""

import argparse
import datetime
import importlib
import os
import resource
import sys
import time
import traceback

from . import plan


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has been busy, those of this process and
    its waited-for children), or None where /proc/stat is not there."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    own = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    return busy, sum(r.ru_utime + r.ru_stime for r in own)


def others_share(before, after, wall: float) -> float | None:
    """The share of all cores that other processes used between two `cpu_seconds`."""
    if before is None or after is None or wall <= 0:
        return None
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / (wall * (os.cpu_count() or 1))


def index_page(device: str, mode: str, results: list[tuple]) -> str:
    """The run's one page: what ran, how long it took, and where each sweep's page and plots are."""
    lines = [f"# `python -m perf` on {device} ({mode} plan), {datetime.date.today()}", "",
             f"`others`: the share of the machine's {os.cpu_count()} cores that other processes used during the "
             "sweep; past a few percent its times are disturbed, not to be quoted.", "",
             "| sweep | status | wall s | others | command |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {s.name} | {status} | {wall:.0f} | {'' if others is None else f'{others:.0%}'} | "
              f"`{s.command().replace(plan.RESULTS + os.sep, '')}` |" for s, status, wall, others in results]
    lines += [""]
    for s, *_ in results:
        stem = os.path.splitext(s.csv)[0]
        folder = os.path.dirname(s.csv)
        pages = sorted(f for f in os.listdir(folder) if f.startswith(os.path.basename(stem))
                       and f.endswith((".md", ".png"))) if os.path.isdir(folder) else []
        lines += [f"## {s.name}", "", f"CSV: [{os.path.basename(s.csv)}]({os.path.basename(s.csv)})"]
        lines += [f"![{p}]({p})" if p.endswith(".png") else f"Summary: [{p}]({p})" for p in pages] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="every sweep's full set of cases (on a 2-core CPU, "
                        "well over half an hour)")
    parser.add_argument("--quick", action="store_true", help="each sweep's smoke test")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: the GPU where there is one)")
    parser.add_argument("--dry-run", action="store_true", help="list the sweeps, their arguments and cases; run nothing")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full" if args.full else "default"

    import torch

    from . import _bench

    dev = _bench.device(args.device)
    # The GPU's name in file names; a dry run for a GPU on a machine without one plans for "cuda".
    gpu_here = dev.type == "cuda" and torch.cuda.is_available()
    name = _bench.device_name(dev).replace(" ", "_") if gpu_here else dev.type
    sweeps = plan.sweeps(dev.type, full=args.full, quick=args.quick, device=args.device or dev.type,
                         stem=f"{name}-{datetime.date.today()}")
    if args.dry_run:
        print(f"{mode} plan on {dev.type}:")
        for s in sweeps:
            cases = importlib.import_module(s.module).planned(list(s.args))
            print(f"{s.name}: {s.command()}")
            print("\n".join(f"    {case}" for case in cases))
        return 0
    print(f"{mode} plan on {_bench.device_name(dev)}, torch {torch.__version__}: "
          + ", ".join(s.name for s in sweeps), flush=True)
    results = []
    for s in sweeps:
        started, cpu = time.perf_counter(), cpu_seconds()
        print(f"== {s.name}: {s.command()}", flush=True)
        try:
            note = importlib.import_module(s.module).main(list(s.args))
            # A sweep stopped at its time limit says how many cases it did.
            status = f"ok, {note}" if isinstance(note, str) else "ok"
        except Exception:  # the other sweeps still run; the exit status says one failed
            traceback.print_exc()
            status = "FAILED"
        wall = time.perf_counter() - started
        results.append((s, status, wall, others_share(cpu, cpu_seconds(), wall)))
        print(f"== {s.name}: {status} in {time.perf_counter() - started:.0f} s", flush=True)
    page = os.path.join(plan.RESULTS, f"summary-{name}-{datetime.date.today()}"
                        + ("-quick" if args.quick else "-full" if args.full else "") + ".md")
    os.makedirs(plan.RESULTS, exist_ok=True)
    with open(page, "w") as f:
        f.write(index_page(_bench.device_name(dev), mode, results))
    print(f"wrote {page}")
    return 0 if all(status.startswith("ok") for _, status, *_ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
