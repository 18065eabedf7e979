"""Fused linear + sigmoid cross entropy for huge label spaces: one chunked engine
(`fused_sigxent::linear_sigmoid_ce`) behind `fs.linear_sigmoid_cross_entropy`
and `fs.siglip_loss` (SPEC section 7, issue 13).

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
(B, C) tensor. That is the issue's "correction at the positive positions"
done before the loss rather than after it: the loss op must read a labels
tensor of the chunk's shape in any case (an all-zero one for the
correction), so writing the positives into it costs no extra bytes, and
each positive's loss is computed once from its own label, with no
cancellation of (loss at 1) - (loss at 0) against a large row sum.

The per-chunk loss and gradient are the existing op's implementation
(`sigmoid_ce_fwd`, FUSED_SIGXENT_BACKEND picks its reference, CPU or
Triton one), given the logits chunk as its gradient output
(`grad_logits_out`): each element's gradient is written where its logit
was, after that logit is read. Everything here is PyTorch ops and that
implementation: no host reads on CUDA tensors
(the class-index range check is `torch._assert_async` there), and the chunk
order is fixed, so results are bitwise reproducible.
"""

import torch
from torch import Tensor

from . import _dispatch, _reference, _validate
from . import _reduction as R

# How the summed loss (and every gradient) is divided; the op's `reduction` argument.
DIVIDE_BY_ONE = 0  # "sum"
DIVIDE_BY_NUMEL = 1  # "mean": B * C, NaN loss when empty (as PyTorch's mean)
DIVIDE_BY_ROWS = 2  # SigLIP: B (open_clip divides the pairwise sum by the batch)
REDUCTIONS = {"sum": DIVIDE_BY_ONE, "mean": DIVIDE_BY_NUMEL}

# Logits elements per chunk when chunk_size is None, and the fewest rows.
# CPU: 8M elements (a 32 MiB float32 chunk, 32 MiB of its gradient, 8 MiB of
# labels). Timed on this 2-core machine (B=2048, H=256, C=32768 float32,
# fwd+bwd, best of 4 interleaved rounds): 128..512 rows per chunk (4M..16M
# elements) all ran within 1% of PyTorch eager (1.28 s), 64 rows 14% and 32
# rows 35% slower: with few rows, each chunk's three GEMMs re-read the whole
# weight. Hence at least 64 rows, even where C is so large that 8M elements
# would be fewer rows (C = 262144: 64 rows, 144 MiB of chunk buffers).
# CUDA: 128M elements (256 MiB of bf16 logits), so the GEMMs keep M >= 800
# rows at C = 152k; a target, not yet measured on a GPU.
CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 27}
MIN_CHUNK_ROWS = 64


def chunk_rows(rows: int, classes: int, device: torch.device, chunk_size: int = 0) -> int:
    """Rows per chunk: `chunk_size` if given, else CHUNK_ELEMENTS // C (at
    least MIN_CHUNK_ROWS), never more than `rows` nor fewer than 1."""
    if chunk_size > 0:
        return max(1, min(chunk_size, rows))
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"])
    return max(1, min(max(budget // max(classes, 1), MIN_CHUNK_ROWS), rows))


def _check_class_indices(positives: Tensor, classes: int) -> None:
    """Every class index in [-1, C). A CPU tensor is checked here (a host read
    of a CPU tensor costs no sync) and raises ValueError; a CUDA one with
    torch._assert_async, a device-side assertion with no host sync, so an
    index out of range stops the run rather than reading out of bounds."""
    if positives.numel() == 0:
        return
    bad = (positives < -1) | (positives >= classes)
    if positives.device.type == "cpu":
        if bad.any():
            lo, hi = int(positives.min()), int(positives.max())
            raise ValueError(
                f"target holds class indices outside [-1, {classes}) (C = weight.shape[0] = {classes}); "
                f"got values from {lo} to {hi}"
            )
    else:
        torch._assert_async(~bad.any(), f"target holds class indices outside [-1, {classes})")


def _scatter_indices(positives: Tensor) -> tuple[Tensor, Tensor]:
    """(columns, values) that write a chunk's positives into its label buffer
    with scatter_, deterministically: a -1 (padding) points at its row's
    largest positive with value True (already True there), or, in a row with
    none, at column 0 with value False. So every write to a position carries
    the same value, and duplicates are harmless."""
    row_max = positives.max(dim=1, keepdim=True).values
    columns = torch.where(positives >= 0, positives, row_max.clamp_min(0))
    values = (positives >= 0) | (row_max >= 0)
    return columns, values


def _loss_and_grad_in_place(logits, labels, pos_weight, label_smoothing, ct, want_grad: bool) -> Tensor:
    """A chunk's summed loss (0-d, ct) by the loss op's implementation (the
    backend's: Triton, CPU path or reference); with `want_grad`, its
    gradient d(sum)/d(logits) replaces the logits in place. Called from
    inside this op's own implementation, so nothing traces or transforms
    the call, and the dispatcher's wrapper, which allows no output to alias
    an input, is not needed."""
    out = {"grad_logits_out": logits} if want_grad else {}
    total, _, _, _ = _dispatch.run("sigmoid_ce_fwd", logits.device, logits, labels, None, pos_weight, label_smoothing,
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
    (-1 = none). pos_weight broadcasts to (C,). The loss is the summed
    elementwise loss divided as `reduction` (DIVIDE_BY_*) says, in float32
    (float64 for float64 input); each gradient is for an incoming gradient
    of 1, in its tensor's dtype, and empty where not asked for.
    """
    if positives is not None:
        _check_class_indices(positives, weight.shape[0])
    n_rows, n_cols = input.shape[0], weight.shape[0]
    ct = _reference.compute_dtype(input.dtype)
    rows = chunk_rows(n_rows, n_cols, input.device, chunk_size)
    any_grad = need_grad_input or need_grad_weight or need_grad_bias or need_grad_scale or need_grad_pos_weight
    divisor = {DIVIDE_BY_ONE: 1, DIVIDE_BY_NUMEL: n_rows * n_cols, DIVIDE_BY_ROWS: n_rows}[reduction]

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
            columns, values = _scatter_indices(positives[start:end])
            labels = labels_buffer[: end - start].scatter_(1, columns, values)
        if need_grad_pos_weight:  # from the logits, before their gradient replaces them
            z = _reference.smoothed_labels(labels, label_smoothing, ct)
            acc_pos_weight += _reference.grad_wrt_pos_weight(logits.to(ct), z).sum(0)
        # The chunk's summed loss and, in the same pass, d(sum)/d(logits)
        # written over the logits themselves (no second chunk-sized buffer).
        partial_sums.append(_loss_and_grad_in_place(logits, labels, pos_weight, label_smoothing, ct, any_grad))
        dlogits = logits
        if target is None:
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


@torch.library.custom_op("fused_sigxent::linear_sigmoid_ce", mutates_args=())
def linear_sigmoid_ce(
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
    """The engine as an op: see `run_chunks`."""
    return run_chunks(
        input, weight, bias, scale, target, positives, pos_weight, label_smoothing, reduction, chunk_size,
        need_grad_input, need_grad_weight, need_grad_bias, need_grad_scale, need_grad_pos_weight)


@linear_sigmoid_ce.register_fake
def _(input, weight, bias, scale, target, positives, pos_weight, label_smoothing, reduction, chunk_size,
      need_grad_input, need_grad_weight, need_grad_bias, need_grad_scale, need_grad_pos_weight):
    ct = _reference.compute_dtype(input.dtype)

    def grad(needed, t, fallback):
        return t.new_empty(t.shape) if needed else (fallback if t is None else t).new_empty(0)

    return (
        input.new_empty((), dtype=ct),
        grad(need_grad_input, input, input),
        grad(need_grad_weight, weight, weight),
        grad(need_grad_bias, bias, input),
        grad(need_grad_scale, scale, input),
        grad(need_grad_pos_weight, pos_weight, input),
    )


def _setup_context(ctx, inputs, output):
    _, *grads = output
    ctx.mark_non_differentiable(*grads)
    # Autograd would otherwise make zero "incoming gradients" for those outputs.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*grads)
    ctx.needs = tuple(inputs[10:15])


def _backward(ctx, grad, *_):
    """The forward wrote every gradient for an incoming gradient of 1: scale them."""
    if grad is None:
        return (None,) * 15
    if torch.is_grad_enabled():
        # create_graph=True: these gradients were computed in the forward, as
        # data; returned here they would differentiate as constants, a
        # silently zero second derivative.
        raise RuntimeError(
            "fused_sigxent's fused linear losses (linear_sigmoid_cross_entropy, siglip_loss) do not support "
            "double backward (create_graph=True): their gradients are computed in the forward. Use the unfused "
            "composition, fs.binary_cross_entropy_with_logits(F.linear(input, weight, bias), target)")
    grad_input, grad_weight, grad_bias, grad_scale, grad_pos_weight = (
        g * grad if need else None for g, need in zip(ctx.saved_tensors, ctx.needs))
    return (grad_input, grad_weight, grad_bias, grad_scale, None, None, grad_pos_weight) + (None,) * 8


linear_sigmoid_ce.register_autograd(_backward, setup_context=_setup_context)


def _needs(*tensors: Tensor | None) -> list[bool]:
    grad_mode = torch.is_grad_enabled()
    return [grad_mode and t is not None and t.requires_grad for t in tensors]


def check_mode(name: str, *tensors: Tensor | None) -> None:
    """Refuses, by name, what the chunked engine cannot serve: a torch.func
    transform (its gradients are data from the forward, not a functorch
    formula) and DTensor inputs (no sharding rule)."""
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            f"{name} does not support torch.func transforms (grad, vmap, jacrev, ...): use the unfused "
            "composition fs.binary_cross_entropy_with_logits(F.linear(...), ...)")
    if _validate.is_dtensor(*tensors):
        raise NotImplementedError(f"{name} does not support DTensor inputs: pass local tensors (to_local())")


def _chunk_size(value) -> int:
    """0 (choose from the sizes) for None, else a positive int."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"chunk_size must be a positive int or None; got {type(value).__name__}")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"chunk_size must be a positive int or None; got {value}")
    return value


def _same_device(name: str, t: Tensor, x: Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but input is on {x.device}")


def linear_sigmoid_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    pos_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """`F.binary_cross_entropy_with_logits(F.linear(input, weight, bias), target,
    pos_weight=pos_weight)` (with SPEC section 2's label smoothing), never
    holding the (B, C) logits: chunks of `chunk_size` rows at a time.

    input (..., H); weight (C, H) as nn.Linear.weight; bias (C,) or None;
    pos_weight (C,) (or one number's tensor). target: dense (..., C)
    floating, bool or uint8 labels; or int64 positive classes, shape (...,)
    (one per row) or (..., K) (padded with -1; a class listed twice counts
    once). reduction "mean" (sum / (B * C)) or "sum". The loss is float32
    (float64 for float64 input). Gradients for input, weight, bias and
    pos_weight; the target is not differentiated (an error if it requires grad).
    """
    _validate.not_scripted()
    check_mode("linear_sigmoid_cross_entropy", input, weight, target, bias, pos_weight)
    x = _validate.logits("input", input)
    w = _validate.tensor("weight", weight)
    if x.dim() < 1:
        raise ValueError("input must have at least one dimension (..., H); got a 0-d tensor")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D (C, H), as nn.Linear.weight; got shape {tuple(w.shape)}")
    if w.dtype != x.dtype:
        raise TypeError(f"weight must have input's dtype {x.dtype} (the matmul runs in it); got {w.dtype}")
    _same_device("weight", w, x)
    n_cols, hidden = w.shape
    if x.shape[-1] != hidden:
        raise ValueError(
            f"input's last dimension H = {x.shape[-1]} does not match weight's H = {hidden} "
            f"(input {tuple(x.shape)}, weight {tuple(w.shape)})"
        )
    b = None
    if bias is not None:
        b = _validate.tensor("bias", bias)
        if tuple(b.shape) != (n_cols,):
            raise ValueError(f"bias must have shape (C,) = ({n_cols},) for weight {tuple(w.shape)}; got {tuple(b.shape)}")
        if not b.is_floating_point():
            raise TypeError(f"bias must be floating; got {b.dtype}")
        _same_device("bias", b, x)
    p = None
    if pos_weight is not None:
        p = _validate.tensor("pos_weight", pos_weight)
        if p.dim() > 1 or (p.dim() == 1 and p.shape[0] not in (1, n_cols)):
            raise ValueError(
                f"pos_weight must have shape (C,) = ({n_cols},) (or (1,) or ()) for weight {tuple(w.shape)}; "
                f"got {tuple(p.shape)}")
        if not p.is_floating_point():
            raise TypeError(f"pos_weight must be floating; got {p.dtype}")
        _same_device("pos_weight", p, x)
    z = _validate.tensor("target", target)
    _same_device("target", z, x)
    batch = tuple(x.shape[:-1])
    dense = positives = None
    if z.dtype == torch.int64:
        if tuple(z.shape) == batch:
            positives = z.reshape(-1, 1)
        elif tuple(z.shape[:-1]) == batch and z.dim() == x.dim():
            positives = z.reshape(-1, z.shape[-1])
        else:
            raise ValueError(
                f"int64 target (positive classes) must have shape {batch} or {batch + ('K',)} for input "
                f"{tuple(x.shape)}; got {tuple(z.shape)}")
    elif z.is_floating_point() or z.dtype in _validate.BYTE_LABEL_DTYPES:
        if tuple(z.shape) != batch + (n_cols,):
            raise ValueError(
                f"dense target must have shape {batch + (n_cols,)} (input's rows x C); got target "
                f"{tuple(z.shape)} for input {tuple(x.shape)} and weight {tuple(w.shape)}")
        if z.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "target requires grad, but the fused op does not differentiate its target: use "
                "F.binary_cross_entropy_with_logits(F.linear(input, weight, bias), target) for soft-label gradients")
        dense = z.reshape(-1, n_cols)
    else:
        raise TypeError(f"target must be floating, bool or uint8 (dense) or int64 (positive classes); got {z.dtype}")
    if reduction == "none":
        raise ValueError(
            "reduction='none' is not supported: the fused op never holds the (B, C) loss. Use the unfused "
            "F.binary_cross_entropy_with_logits(F.linear(input, weight, bias), target, reduction='none')")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction!r} is not a valid value for reduction: use 'mean' or 'sum'")
    s = _validate.label_smoothing(label_smoothing)
    rows = _chunk_size(chunk_size)
    ct = _reference.compute_dtype(x.dtype)
    smoothing = _validate.number_as_tensor(s, x, ct)
    x2 = x.reshape(-1, hidden)
    needs = _needs(x, w, b, None, p)
    loss, *_ = torch.ops.fused_sigxent.linear_sigmoid_ce(
        x2, w, b, None, dense, positives, p, smoothing, REDUCTIONS[reduction], rows, *needs)
    return loss
