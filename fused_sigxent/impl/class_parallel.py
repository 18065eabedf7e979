"""The class-parallel fused linear head: each rank holds a block of the
classes (its rows of the weight, bias and pos_weight) and runs the chunked
engine on every input row against its block only, so it never holds more
than one chunk of its (B, C / W) logits and the weight is never gathered.

Communication per step, B rows of H features: the loss's sum, one scalar
all-reduced; with a data-parallel trunk (each rank its own rows) the rows
all-gathered in the forward (B H) and their gradient reduce-scattered back in
the backward (B H); with a replicated trunk the input gradient all-reduced in
the backward (B H)."""

import torch
import torch.distributed as dist
from torch import Tensor

from ..core import reduction as R


def gather_rows(t: Tensor, group) -> Tensor:
    """Every rank's rows of `t`, in rank order. Shards may be uneven (DTensor
    gives the last ranks fewer rows): each is padded to the longest, then cut."""
    world = dist.get_world_size(group)
    rows = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    every = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(every, rows, group=group)
    counts = [int(r) for r in torch.cat(every).tolist()]
    longest = max(counts)
    padded = t if t.shape[0] == longest else torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:count] for part, count in zip(parts, counts)]), counts


def scatter_rows(t: Tensor, counts: list[int], group) -> Tensor:
    """This rank's rows of the sum over ranks of `t` (rows as `gather_rows`
    gathered them): a reduce-scatter of the padded blocks."""
    rank, longest = dist.get_rank(group), max(counts)
    blocks, start = [], 0
    for count in counts:
        block = t[start:start + count]
        start += count
        blocks.append(block if count == longest else torch.cat([block, block.new_zeros((longest - count,
                                                                                         *block.shape[1:]))]))
    mine = torch.empty_like(blocks[0])
    dist.reduce_scatter(mine, [b.contiguous() for b in blocks], group=group)
    return mine[:counts[rank]]


def forward(x: Tensor, weight: Tensor, bias, pos_weight, dense, positives, smoothing: Tensor, mean: bool,
            n_classes: int, chunk_size: int, needs: tuple, group):
    """(loss, grad_x, grad_weight, grad_bias, grad_pos_weight) of this rank's
    class block for every row of `x`: the loss summed over all ranks (one
    scalar all-reduced), divided by B * C for the mean; each gradient for an
    incoming gradient of 1, grad_x this block's part only."""
    need_x, need_w, need_b, need_p = needs
    total, grad_x, grad_w, grad_b, _, grad_p = torch.ops.fused_sigxent.linear_sigmoid_ce(
        x, weight, bias, None, dense, positives, pos_weight, smoothing, R.SUM, chunk_size, need_x, need_w, need_b,
        False, need_p)
    dist.all_reduce(total, group=group)
    divisor = x.shape[0] * n_classes if mean else 1
    if divisor == 0:  # an empty mean: NaN, zero gradients (as PyTorch)
        return total * float("nan"), grad_x.zero_(), grad_w.zero_(), grad_b.zero_(), grad_p.zero_()
    if divisor == 1:
        return total, grad_x, grad_w, grad_b, grad_p
    return (total / divisor, grad_x.div_(divisor), grad_w.div_(divisor), grad_b.div_(divisor),
            grad_p.div_(divisor))
