"""`python -m perf.class_parallel`: the class-parallel fused linear head on
W = 1 and 2 gloo ranks of this machine (W = 1: the single-device fused call
on the whole weight): time per training step and per-rank peak memory, for
a replicated (tensor-parallel) and a row-sharded (data-parallel) trunk with
sparse positives; one tidy CSV row per (trunk, W, metric).

Per-rank peak memory is resident memory above the inputs (VmHWM, reset just
before the measured steps, MALLOC_MMAP_THRESHOLD_=131072), in fresh processes."""

import argparse
import datetime
import json

import pandas as pd
import torch

from . import _bench
from ._dist import run_ranks, time_and_peak
from .siglip_dist import COLUMNS

# B rows, H features, C classes, K positives per row.
SIZES = {"quick": (512, 128, 16384, 8), "default": (2048, 256, 32768, 8)}
STEPS = {"quick": 2, "default": 3}
WORLDS = (1, 2)


def measure(rank, world, trunk, b, h, c, k, steps):
    """(median seconds per fwd+bwd step, peak bytes above the inputs) on this rank."""
    import fused_sigxent as fs

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, h, generator=g)
    w = torch.randn(c, h, generator=g) * 0.05
    ids = torch.randint(0, c, (b, k), generator=g)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        placement = Replicate() if trunk == "replicated" else Shard(0)
        x = distribute_tensor(x, mesh, [placement])
        w = distribute_tensor(w, mesh, [Shard(0)])
        ids = distribute_tensor(ids, mesh, [placement])
    x.requires_grad_()
    w.requires_grad_()

    def step():
        fs.linear_sigmoid_cross_entropy(x, w, ids).backward()
        x.grad = w.grad = None

    return time_and_peak(step, steps, barrier=world > 1)


def planned(argv) -> list[str]:
    """The cases `main(argv)` would run, one line each (a dry run)."""
    b, h, c, k = SIZES["quick" if "--quick" in argv else "default"]
    return [f"{trunk} trunk W={world} B={b} H={h} C={c} K={k} float32" for trunk in ("replicated", "data_parallel")
            for world in WORLDS]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"B, H, C, K = {SIZES['quick']} "
                        f"(default {SIZES['default']})")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    size = "quick" if args.quick else "default"
    b, h, c, k = SIZES[size]
    env = _bench.environment(torch.device("cpu"))
    print(f"class-parallel linear head, B={b}, H={h}, C={c}, {k} positives per row, float32, gloo on this CPU")
    rows = []
    for trunk in ("replicated", "data_parallel"):
        for world in WORLDS:
            ranks = run_ranks(world, "perf.class_parallel", "measure", trunk, b, h, c, k, STEPS[size],
                              env={"MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"})
            seconds, peak = max(s for s, _ in ranks), max(p for _, p in ranks)
            common = dict(op=f"linear_sigmoid_ce/class_parallel/{trunk}", provider="fused_sigxent", mode="fwd+bwd",
                          dtype="float32", n_rows=b, n_cols=c, world_size=world, device_name=env["device"],
                          timestamp=datetime.datetime.now().isoformat(timespec="seconds"),
                          package_version=f"torch {env['torch_version']}",
                          config=json.dumps({"commit": env["commit"], "backend": "gloo", "H": h, "K": k,
                                             "steps": STEPS[size]}))
            rows.append(dict(common, metric="step_time", unit="ms", p50=seconds * 1e3, p20=seconds * 1e3,
                             p80=seconds * 1e3))
            rows.append(dict(common, metric="peak_mem_per_rank", unit="bytes", p50=peak, p20=peak, p80=peak))
            print(f"{trunk:14s} W={world}  {seconds * 1e3:9.1f} ms/step  {peak / 2**20:8.1f} MiB per rank", flush=True)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    _bench.save_csv(frame, "class_parallel-", torch.device("cpu"), args.out)
    return frame


if __name__ == "__main__":
    main()
