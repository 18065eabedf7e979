"""SigLIP over the global batch of a process group: a ring over the chunked
engine. In the forward each rank's text features travel the ring and each
block is scored by the engine on arrival (the next block already in flight);
in the backward each rank's image features travel the ring, with the scale,
bias and incoming gradient of the loss they belong to, so every rank
computes its own text features' gradient from every rank's loss. Nothing of
size n x n, and no peer's block, outlives its use: per-rank memory does not
grow with the world size.

Per rank and step, with W ranks of n rows of D features: the forward sends
(W - 1) n D elements, the backward (W - 1) (n D + 3), the same as an
exchange that keeps every received block for autograd; the engine runs
twice per block pair (logits and one gradient each way) instead of once.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from ..core import reduction as R


def _engine(x, y, bias, scale, positives, chunk_size, need_x, need_y, need_bias, need_scale):
    """The chunked op on one block pair: the summed pairwise loss of x's rows
    against y's (positives: each row's matching column, or none), divided
    by x's rows, and the gradients asked for, for an incoming gradient of 1."""
    smoothing = torch.zeros((), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    return torch.ops.fused_sigxent.linear_sigmoid_ce(
        x, y, bias, scale, None, positives, None, smoothing, R.MEAN_BY_ROWS, chunk_size, need_x, need_y, need_bias,
        need_scale, False)


class Ring:
    """A process group's ring: this rank, the world size, and the global
    ranks of the neighbours it sends to and receives from."""

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.to_next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.from_previous = dist.get_global_rank(group, (self.rank - 1) % self.world)

    def pass_on(self, sent: list[Tensor], received: list[Tensor]) -> list:
        """Starts sending `sent` to the next rank and receiving `received`
        from the previous one; returns the works to wait on."""
        ops = [dist.P2POp(dist.isend, t, self.to_next, self.group) for t in sent]
        ops += [dist.P2POp(dist.irecv, t, self.from_previous, self.group) for t in received]
        return dist.batch_isend_irecv(ops)


def check_equal_blocks(ring: Ring, x: Tensor, text_needs_grad: bool) -> None:
    """Every rank's (n, D, dtype) the same, and the text gradient needed on
    all ranks or none (its ring runs in the backward), or a ValueError on
    every rank before any block travels: a ring of unequal blocks would hang
    or read garbage. One all-gather of four integers, read on the host."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    mine = torch.tensor([x.shape[0], x.shape[1], dtypes.index(x.dtype), int(text_needs_grad)], dtype=torch.int64,
                        device=x.device)
    every = [torch.empty_like(mine) for _ in range(ring.world)]
    dist.all_gather(every, mine, group=ring.group)
    rows = torch.stack(every).tolist()
    if any(r != rows[0] for r in rows):
        blocks = "; ".join(f"rank {k}: n={n}, D={d}, {dtypes[c]}, text grad {bool(g)}"
                           for k, (n, d, c, g) in enumerate(rows))
        raise ValueError(
            "siglip_loss over a process group needs the same local batch (n, D) and dtype on every rank, and "
            f"text_features requiring grad on all ranks or none; got {blocks}")


def forward(ring: Ring, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor | None, chunk_size: int,
            needs: tuple[bool, bool, bool, bool]):
    """(loss, grad_x, grad_scale, grad_bias, grad_y from this rank's own loss),
    each gradient for an incoming gradient of 1 and empty where not needed
    (needs: x, y, scale, bias). The text blocks travel the ring: block k
    arrives from rank - k while block k - 1 is scored."""
    need_x, need_y, need_scale, need_bias = needs
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = x.shape[0]
    diagonal = torch.arange(n, device=x.device).unsqueeze(1)
    negatives = torch.empty((n, 0), dtype=torch.int64, device=x.device)
    current, arriving = y.contiguous(), torch.empty_like(y, memory_format=torch.contiguous_format)
    works = ring.pass_on([current], [arriving]) if ring.world > 1 else []
    loss, grad_x, grad_y_own, grad_bias, grad_scale, _ = _engine(
        x, current, bias, scale, diagonal, chunk_size, need_x, need_y, need_bias, need_scale)
    # Sums over the blocks in the compute dtype: one rounding, not W.
    grad_x, grad_bias, grad_scale = grad_x.to(ct), grad_bias.to(ct), grad_scale.to(ct)
    spare = torch.empty_like(arriving) if ring.world > 2 else None
    for step in range(1, ring.world):
        for work in works:
            work.wait()
        current, arriving = arriving, spare
        works = ring.pass_on([current], [arriving]) if step < ring.world - 1 else []
        part, gx, _, gb, gs, _ = _engine(x, current, bias, scale, negatives, chunk_size, need_x, False, need_bias,
                                         need_scale)
        loss = loss + part
        if need_x:
            grad_x += gx
        if need_bias:
            grad_bias += gb
        if need_scale:
            grad_scale += gs
        spare = current  # scored: its buffer takes the block after next
    return loss, grad_x.to(x.dtype), grad_scale.to(scale.dtype), grad_bias.to(ct if bias is None else bias.dtype), \
        grad_y_own


def backward_text(ring: Ring, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor | None, grad: Tensor,
                  grad_y_own: Tensor, chunk_size: int) -> Tensor:
    """This rank's text gradient: every rank's loss, each scaled by that
    rank's own incoming gradient (so ranks may weight their losses
    differently). The image blocks travel the ring with their rank's
    (scale, bias, incoming gradient), and each is scored against this
    rank's text on arrival: only the text gradient, recomputed."""
    ct = torch.float64 if y.dtype == torch.float64 else torch.float32
    total = grad_y_own.to(ct) * grad.to(ct)
    if ring.world == 1:
        return total.to(y.dtype)
    n = x.shape[0]
    negatives = torch.empty((n, 0), dtype=torch.int64, device=x.device)
    # (scale, bias, incoming gradient) of the image block's loss, as one message.
    scalars = torch.stack([scale.reshape(()).to(ct), (torch.zeros((), dtype=ct, device=x.device) if bias is None
                                                      else bias.reshape(()).to(ct)), grad.reshape(()).to(ct)])
    current = (x.contiguous(), scalars)
    arriving = (torch.empty_like(current[0]), torch.empty_like(scalars))
    works = ring.pass_on(list(current), list(arriving))
    spare = (torch.empty_like(current[0]), torch.empty_like(scalars)) if ring.world > 2 else None
    for step in range(1, ring.world):
        for work in works:
            work.wait()
        current, arriving = arriving, spare
        works = ring.pass_on(list(current), list(arriving)) if step < ring.world - 1 else []
        block, (s, b, g) = current[0], current[1].unbind()
        _, _, gy, _, _, _ = _engine(block, y, None if bias is None else b.to(bias.dtype), s.to(scale.dtype),
                                    negatives, chunk_size, False, True, False, False)
        total += gy.to(ct) * g
        spare = current
    return total.to(y.dtype)
