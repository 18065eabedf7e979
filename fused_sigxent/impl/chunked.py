"""The chunked engine of the fused linear losses (`fused_sigxent::linear_sigmoid_ce`,
behind `fs.linear_sigmoid_cross_entropy` and `fs.siglip_loss`): the loss and
every gradient of a linear layer's (B, C) logits, never holding them.

Per chunk of `rows` rows of the input, in a fixed order:
  logits = scale * (input[chunk] @ weight.T) + bias          (a matmul; the input dtype,
                                                              fp32 accumulation inside it)
  loss partial = sigmoid_ce_fwd(logits, labels, SUM), and in the same pass
  dlogits = d(partial)/d(logits) written over the logits chunk itself
  grad_input[chunk] = dlogits @ weight                      (times scale / divisor at the end)
  grad_weight      += dlogits.T @ (scale * input[chunk])    (an fp32 accumulator)
  grad_bias        += column sums of dlogits                (fp32)
  grad_scale       += sum((dlogits @ weight) * input[chunk])  (d/dt of t <x, y>: no extra pass over logits)
so the (B, C) logits exist one chunk at a time: the peak above the inputs
is about rows * C * (1 logits-sized buffer + 1 byte of labels) plus the
gradients themselves (an fp32 (C, H) accumulator), never O(B * C). The
backward only multiplies those gradients by the incoming gradient.

Sparse targets (int64 positive classes per row, -1 padding, duplicates)
are scattered into a one-byte (rows, C) label buffer reused by every chunk
(and cleared again by the same scatter), so they never become a dense
(B, C) tensor. Writing the positives into the labels costs no extra bytes
(the loss reads a labels tensor of the chunk's shape in any case), and each
positive's loss is computed once from its own label, with no cancellation of
(loss at 1) - (loss at 0) against a large row sum, as a correction at the
positive positions after an all-negative loss would have.

The per-chunk loss and gradient are the loss op's implementation
(`sigmoid_ce_fwd`; FUSED_SIGXENT_BACKEND picks its reference, CPU or
Triton one), given the logits chunk as its gradient output
(`grad_logits_out`, see `impl.Implementation`): each element's gradient is
written where its logit was, after that logit is read. Everything here is PyTorch ops and that
implementation: no host reads on CUDA tensors
(the class-index range check is `torch._assert_async` there), and the chunk
order is fixed, so results are bitwise reproducible.
"""

import torch
from torch import Tensor

from ..core import reduction as R
from ..core.dtypes import compute_dtype
from . import reference, run

# How the summed loss (and every gradient) is divided: R.SUM, R.TORCH_MEAN
# (by B * C, NaN when empty, as PyTorch's mean) or R.MEAN_BY_ROWS (by B,
# SigLIP's: open_clip divides the pairwise sum by the batch).
REDUCTIONS = (R.SUM, R.TORCH_MEAN, R.MEAN_BY_ROWS)

# Logits elements per chunk when chunk_size is None, and the fewest rows.
# CPU: 8M elements (a 32 MiB float32 chunk, 32 MiB of its gradient, 8 MiB of
# labels); with fewer than 64 rows, each chunk's three GEMMs re-read the
# whole weight too often (the sweep: docs/performance.md), so at least 64
# rows, even where C is so large that 8M elements would be fewer rows.
# CUDA: 128M elements (256 MiB of bf16 logits), so the GEMMs keep M >= 800
# rows at C = 152k.
CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 27}
MIN_CHUNK_ROWS = 64
# More rows than any batch: chunk_rows then says what the budget alone gives.
MAX_ROWS = 2**62


def chunk_rows(rows: int, classes: int, device: torch.device, chunk_size: int = 0) -> int:
    """Rows per chunk: `chunk_size` if given, else CHUNK_ELEMENTS // C (at
    least MIN_CHUNK_ROWS), never more than `rows` nor fewer than 1."""
    if chunk_size > 0:
        return max(1, min(chunk_size, rows))
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"])
    return max(1, min(max(budget // max(classes, 1), MIN_CHUNK_ROWS), rows))


def _check_class_indices(positives: Tensor, classes: int) -> None:
    """Every class index in [-1, C] (-1 and C: no positive). A CPU tensor is
    checked here (a host read of a CPU tensor costs no sync) and raises
    ValueError; a CUDA one with torch._assert_async, a device-side assertion
    with no host sync, so an index out of range stops the run rather than
    reading out of bounds."""
    if positives.numel() == 0:
        return
    bad = (positives < -1) | (positives > classes)
    if positives.device.type == "cpu":
        if bad.any():
            lo, hi = int(positives.min()), int(positives.max())
            raise ValueError(
                f"target holds class indices outside [-1, {classes}] (C = weight.shape[0] = {classes}; -1 and C "
                f"mean no positive); got values from {lo} to {hi}"
            )
    else:
        torch._assert_async(~bad.any(), f"target holds class indices outside [-1, {classes}]")


def _scatter_indices(positives: Tensor, classes: int) -> tuple[Tensor, Tensor]:
    """(columns, values) that write a chunk's positives into its label buffer
    with scatter_, deterministically: an index that names no class (-1 or C)
    points at its row's largest class with value True (already True there),
    or, in a row with none, at column 0 with value False. So every write to
    a position carries the same value, and duplicates are harmless."""
    named = (positives >= 0) & (positives < classes)
    row_max = torch.where(named, positives, -1).max(dim=1, keepdim=True).values
    columns = torch.where(named, positives, row_max.clamp_min(0))
    values = named | (row_max >= 0)
    return columns, values


def _loss_and_grad_in_place(logits, labels, pos_weight, label_smoothing, ct, want_grad: bool) -> Tensor:
    """A chunk's summed loss (0-d, ct) by the loss op's implementation (the
    backend's: Triton, CPU path or reference); with `want_grad`, its
    gradient d(sum)/d(logits) replaces the logits in place. Called from
    inside this op's own implementation, so nothing traces or transforms
    the call, and the dispatcher's wrapper, which allows no output to alias
    an input, is not needed."""
    out = {"grad_logits_out": logits} if want_grad else {}
    total, _, _, _ = run("sigmoid_ce_fwd", logits.device, logits, labels, None, pos_weight, label_smoothing,
                         R.SUM, ct, want_grad, False, **out)
    return total


def _empty(like: Tensor) -> Tensor:
    """The placeholder for a gradient nobody asked for (an op cannot return None)."""
    return like.new_empty(0)


def run_chunks(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor | None,
    target: Tensor | None,
    positives: Tensor | None,
    pos_weight: Tensor | None,
    label_smoothing: Tensor,
    reduction: int,
    chunk_size: int,
    need_grad_input: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    need_grad_scale: bool,
    need_grad_pos_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_input, grad_weight, grad_bias, grad_scale, grad_pos_weight).

    input (B, H), weight (C, H), bias (C,) or 0-d or None (added to every
    logit), scale 0-d or None (multiplies input @ weight.T), and exactly one
    of target (B, C) dense labels or positives (B, K) int64 class indices
    (-1 and C: none). pos_weight broadcasts to (C,). The loss is the summed
    elementwise loss divided as `reduction` (one of REDUCTIONS) says, in float32
    (float64 for float64 input); each gradient is for an incoming gradient
    of 1, in its tensor's dtype, and empty where not asked for.
    """
    if positives is not None:
        _check_class_indices(positives, weight.shape[0])
    n_rows, n_cols = input.shape[0], weight.shape[0]
    ct = compute_dtype(input.dtype)
    rows = chunk_rows(n_rows, n_cols, input.device, chunk_size)
    any_grad = need_grad_input or need_grad_weight or need_grad_bias or need_grad_scale or need_grad_pos_weight
    divisor = {R.SUM: 1, R.TORCH_MEAN: n_rows * n_cols, R.MEAN_BY_ROWS: n_rows}[reduction]

    # The matmuls run in the input dtype: the bias and scale are cast to it.
    addend = None if bias is None else bias.to(input.dtype)
    t = None if scale is None else scale.to(input.dtype)
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format) if need_grad_input else None
    acc_weight = torch.zeros(weight.shape, dtype=ct, device=input.device) if need_grad_weight else None
    acc_bias = torch.zeros(bias.shape, dtype=ct, device=input.device) if need_grad_bias else None
    acc_scale = torch.zeros((), dtype=ct, device=input.device) if need_grad_scale else None
    acc_pos_weight = torch.zeros(n_cols, dtype=ct, device=input.device) if need_grad_pos_weight else None
    logits_buffer = torch.empty((rows, n_cols), dtype=input.dtype, device=input.device)
    labels_buffer = None
    if target is None:
        # One byte per chunk element, reused by every chunk (each clears its own positives).
        labels_buffer = torch.zeros((rows, n_cols), dtype=torch.bool, device=input.device)
        if positives is None:  # SigLIP: the diagonal
            positives = torch.arange(n_rows, device=input.device).unsqueeze(1)
    partial_sums = []
    for start in range(0, n_rows, rows):
        end = min(start + rows, n_rows)
        x = input[start:end]
        xs = x if t is None else x * t
        # The chunk's logits: one matmul (the bias added by it), into a buffer
        # every chunk reuses (a fresh allocation would fault its pages in again).
        logits = logits_buffer[: end - start]
        if addend is None:
            torch.mm(xs, weight.T, out=logits)
        else:
            torch.addmm(addend, xs, weight.T, out=logits)
        if target is not None:
            labels = target[start:end]
        else:
            labels = labels_buffer[: end - start]
            # (K = 0: a batch with no positives; C = 0: a class-parallel rank
            # with no classes. The buffer's zeros either way.)
            scatter = positives.shape[1] > 0 and n_cols > 0
            if scatter:
                columns, values = _scatter_indices(positives[start:end], n_cols)
                labels.scatter_(1, columns, values)
        if need_grad_pos_weight:  # from the logits, before their gradient replaces them
            z = reference.smoothed_labels(labels, label_smoothing, ct)
            acc_pos_weight += reference.grad_wrt_pos_weight(logits.to(ct), z).sum(0)
        # The chunk's summed loss and, in the same pass, d(sum)/d(logits)
        # written over the logits themselves (no second chunk-sized buffer).
        partial_sums.append(_loss_and_grad_in_place(logits, labels, pos_weight, label_smoothing, ct, any_grad))
        dlogits = logits
        if target is None and scatter:
            labels.scatter_(1, columns, False)  # the buffer is all zeros again for the next chunk
        if need_grad_input or need_grad_scale:
            # d(sum)/d(xs) = dlogits @ weight; grad_input = scale * that, applied at the end.
            g = torch.mm(dlogits, weight, out=grad_input[start:end]) if need_grad_input else dlogits @ weight
            if need_grad_scale:
                acc_scale += torch.dot(g.reshape(-1).to(ct), x.reshape(-1).to(ct))
        if need_grad_weight:
            if acc_weight.dtype == dlogits.dtype:
                acc_weight.addmm_(dlogits.T, xs)
            else:  # half precision: each chunk's product (fp32 inside the GEMM) rounded once, summed in fp32
                acc_weight += torch.mm(dlogits.T, xs)
        if need_grad_bias:
            acc_bias += dlogits.sum(0, dtype=ct) if bias.dim() else dlogits.sum(dtype=ct)
        del dlogits

    total = torch.stack(partial_sums).sum() if partial_sums else torch.zeros((), dtype=ct, device=input.device)
    loss = total / divisor if divisor else total * float("nan")
    inv = 1.0 / divisor if divisor else 0.0  # an empty mean: NaN loss, zero gradients (as PyTorch)
    if need_grad_input:
        grad_input.mul_(inv if scale is None else scale.to(ct) * inv)
    return (
        loss,
        grad_input if need_grad_input else _empty(input),
        acc_weight.mul_(inv).to(weight.dtype) if need_grad_weight else _empty(weight),
        acc_bias.mul_(inv).to(bias.dtype) if need_grad_bias else _empty(input if bias is None else bias),
        acc_scale.mul_(inv).to(scale.dtype) if need_grad_scale else _empty(input if scale is None else scale),
        acc_pos_weight.mul_(inv).sum_to_size(pos_weight.shape).to(pos_weight.dtype)
        if need_grad_pos_weight else _empty(input if pos_weight is None else pos_weight),
    )
