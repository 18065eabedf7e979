"""`python -m perf.siglip_dist`: SigLIP over the global batch on W = 1, 2, 4
gloo ranks of this machine at a fixed n per rank: time per training step and
per-rank peak memory of fused_sigxent's ring and of open_clip's bidirectional
exchange (written here from its description: neighbours swap text blocks
with an autograd-aware exchange, every received block and its n x n logits
kept for the backward); one tidy CSV row per (implementation, W).

Per-rank peak memory is resident memory above the inputs (VmHWM, reset just
before the measured steps, MALLOC_MMAP_THRESHOLD_=131072 so freed buffers go
back to the system), in fresh processes."""

import argparse
import datetime
import json

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import _bench
from ._dist import run_ranks, time_and_peak

COLUMNS = ["op", "provider", "mode", "dtype", "n_rows", "n_cols", "world_size", "metric", "unit", "p50", "p20",
           "p80", "device_name", "timestamp", "package_version", "config"]
# n rows per rank and D features; the sizes the memory figure is quoted at.
SIZES = {"quick": (512, 64), "default": (2048, 256)}
WORLDS = (1, 2, 4)
STEPS = {"quick": 2, "default": 3}


class _NeighbourExchange(torch.autograd.Function):
    """Sends `to_left` to the left neighbour and `to_right` to the right one;
    returns what they sent (from the right, from the left). The backward
    sends each gradient back to the rank its tensor came from."""

    @staticmethod
    def forward(ctx, left, right, to_left, to_right):
        from_right, from_left = torch.empty_like(to_left), torch.empty_like(to_right)
        _swap(left, right, to_left, to_right, from_left, from_right)
        ctx.left, ctx.right = left, right
        return from_right, from_left

    @staticmethod
    def backward(ctx, grad_from_right, grad_from_left):
        grad_to_left, grad_to_right = torch.empty_like(grad_from_right), torch.empty_like(grad_from_left)
        _swap(ctx.right, ctx.left, grad_from_right.contiguous(), grad_from_left.contiguous(), grad_to_right,
              grad_to_left)
        return None, None, grad_to_left, grad_to_right


class _ShiftRight(torch.autograd.Function):
    """Sends `to_right` to the right neighbour; returns what the left one
    sent. The backward sends the gradient back left."""

    @staticmethod
    def forward(ctx, left, right, to_right):
        from_left = torch.empty_like(to_right)
        _exchange([dist.P2POp(dist.isend, to_right, right), dist.P2POp(dist.irecv, from_left, left)])
        ctx.left, ctx.right = left, right
        return from_left

    @staticmethod
    def backward(ctx, grad_from_left):
        grad_to_right = torch.empty_like(grad_from_left)
        _exchange([dist.P2POp(dist.isend, grad_from_left.contiguous(), ctx.left),
                   dist.P2POp(dist.irecv, grad_to_right, ctx.right)])
        return None, None, grad_to_right


def _exchange(ops):
    for work in dist.batch_isend_irecv(ops):
        work.wait()


def _swap(left, right, to_left, to_right, into_from_left, into_from_right):
    _exchange([dist.P2POp(dist.isend, to_left, left), dist.P2POp(dist.isend, to_right, right),
               dist.P2POp(dist.irecv, into_from_left, left), dist.P2POp(dist.irecv, into_from_right, right)])


def _block_loss(x, y, t, b, positives: bool):
    """open_clip's per-block loss: the whole n x n logits and labels."""
    logits = t * x @ y.T + b
    labels = -torch.ones_like(logits)
    if positives:
        labels = labels + 2 * torch.eye(x.shape[0], dtype=x.dtype)
    return -F.logsigmoid(labels * logits).sum() / x.shape[0]


def bidir_loss(x, y, t, b):
    """open_clip's bidir exchange: (W - 1) // 2 two-way swaps, then one
    one-way hop when W - 1 is odd, each received block scored whole."""
    rank, world = dist.get_rank(), dist.get_world_size()
    loss = _block_loss(x, y, t, b, True)
    left, right = (rank - 1) % world, (rank + 1) % world
    to_left = to_right = y
    for _ in range((world - 1) // 2):
        from_right, from_left = _NeighbourExchange.apply(left, right, to_left, to_right)
        loss = loss + _block_loss(x, from_right, t, b, False) + _block_loss(x, from_left, t, b, False)
        to_left, to_right = from_right, from_left
    if (world - 1) % 2:
        # The one block left: one hop to the right.
        loss = loss + _block_loss(x, _ShiftRight.apply(left, right, to_right), t, b, False)
    return loss


def measure(rank, world, impl, n, d, steps):
    """(median seconds per fwd+bwd step, peak bytes above the inputs) on this rank."""
    import fused_sigxent as fs

    torch.set_num_threads(1)
    group = dist.group.WORLD if world > 1 else None
    x = F.normalize(torch.randn(n, d), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(n, d), dim=-1).requires_grad_()
    t, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)

    def step():
        if impl == "fused_sigxent":
            loss = fs.siglip_loss(x, y, t, b, group=group)
        else:
            loss = bidir_loss(x, y, t, b) if world > 1 else _block_loss(x, y, t, b, True)
        loss.backward()
        x.grad = y.grad = t.grad = b.grad = None

    if world > 1:  # the baseline computes the same loss as ours
        torch.testing.assert_close(bidir_loss(x, y, t, b), fs.siglip_loss(x, y, t, b, group=group), rtol=1e-4,
                                   atol=1e-4)
    return time_and_peak(step, steps, barrier=world > 1)


def sweep(n: int, d: int, steps: int) -> list[dict]:
    env = _bench.environment(torch.device("cpu"))
    rows = []
    for impl in ("fused_sigxent", "open_clip_bidir"):
        for world in WORLDS:
            ranks = run_ranks(world, "perf.siglip_dist", "measure", impl, n, d, steps,
                              env={"MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"})
            seconds = max(s for s, _ in ranks)
            peak = max(p for _, p in ranks)
            common = dict(op="siglip_loss/global_batch", provider=impl, mode="fwd+bwd", dtype="float32", n_rows=n,
                          n_cols=d, world_size=world, device_name=env["device"],
                          timestamp=datetime.datetime.now().isoformat(timespec="seconds"),
                          package_version=f"torch {env['torch_version']}",
                          config=json.dumps({"commit": env["commit"], "backend": "gloo", "steps": steps}))
            rows.append(dict(common, metric="step_time", unit="ms", p50=seconds * 1e3, p20=seconds * 1e3,
                             p80=seconds * 1e3))
            rows.append(dict(common, metric="peak_mem_per_rank", unit="bytes", p50=peak, p20=peak, p80=peak))
            print(f"{impl:16s} W={world}  {seconds * 1e3:9.1f} ms/step  {peak / 2**20:8.1f} MiB per rank", flush=True)
    return rows


def planned(argv) -> list[str]:
    """The cases `main(argv)` would run, one line each (a dry run)."""
    n, d = SIZES["quick" if "--quick" in argv else "default"]
    return [f"{impl} W={world} n={n} D={d} float32" for impl in ("fused_sigxent", "open_clip_bidir")
            for world in WORLDS]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"n, D = {SIZES['quick']} (default {SIZES['default']})")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    size = "quick" if args.quick else "default"
    n, d = SIZES[size]
    print(f"SigLIP over the global batch, n={n} per rank, D={d}, float32, W in {WORLDS} gloo ranks on this CPU")
    frame = pd.DataFrame(sweep(n, d, STEPS[size]), columns=COLUMNS)
    memory = frame[frame.metric == "peak_mem_per_rank"].pivot_table(index="world_size", columns="provider",
                                                                      values="p50")
    print((memory / 2**20).round(1).to_string())
    _bench.save_csv(frame, "siglip_dist-", torch.device("cpu"), args.out)
    return frame


if __name__ == "__main__":
    main()
