"""Fused linear + sigmoid cross entropy for huge label spaces: the front end
of the chunked engine (`impl/chunked.py`)."""

import math

import torch
from torch import Tensor

from ..core import reduction as R
from ..core.dtypes import BYTE_LABEL_DTYPES, compute_dtype, number_as_tensor
from ..op import routes
from . import checks

REDUCTIONS = {"sum": R.SUM, "mean": R.TORCH_MEAN}


# Rows per chunk past any batch a device holds: a larger chunk_size means
# the same one chunk, and the op's int argument holds this one.
MAX_CHUNK_ROWS = 2**31 - 1


def chunk_size_argument(value) -> int:
    """0 (choose from the sizes) for None, else a positive int (capped at
    MAX_CHUNK_ROWS: the same single chunk)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"chunk_size must be a positive int or None; got {type(value).__name__}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"chunk_size must be a positive int or None; got {value}")
        return min(value, MAX_CHUNK_ROWS)
    return value


def autocast_matmul_dtype(x: Tensor, *tensors: Tensor | None) -> tuple:
    """x and `tensors` as F.linear takes them under torch.autocast: floating
    tensors other than float64 in the autocast dtype (whatever their own),
    so the matmuls run in it; outside autocast, as they are."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(dtype) if t is not None and t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t

    return tuple(cast(t) for t in (x, *tensors))


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
    pos_weight=pos_weight)` (with the label smoothing of the other losses), never
    holding the (B, C) logits: chunks of `chunk_size` rows at a time.

    input (..., H); weight (C, H) as nn.Linear.weight; bias (C,) or None;
    pos_weight (C,) (or one number's tensor). target: dense (..., C)
    floating, bool or uint8 labels; or int64 positive classes, shape (...,)
    (one per row) or (..., K) with K < C (ids in [0, C); -1 and C mean no
    positive, as padding and as background; a class listed twice counts
    once; K = 0 is a batch with no positives). An int64 target of shape
    (..., C) is refused: it reads as dense 0/1 labels as much as ids.
    reduction "mean" (sum / (B * C)) or "sum". Under torch.autocast the
    matmuls run in the autocast dtype, as F.linear's do. The loss is float32
    (float64 for float64 input). Gradients for input, weight, bias and
    pos_weight; the target is not differentiated (an error if it requires grad).
    """
    routes.refuse_unsupported_linear("linear_sigmoid_cross_entropy", input, weight, target, bias, pos_weight,
                                     class_parallel=True)
    checks.logits("input", input)
    checks.tensor("weight", weight)
    if bias is not None:
        checks.tensor("bias", bias)
    x, w, b = autocast_matmul_dtype(input, weight, bias)
    x = checks.logits("input", x)
    if x.dim() < 1:
        raise ValueError("input must have at least one dimension (..., H); got a 0-d tensor")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D (C, H), as nn.Linear.weight; got shape {tuple(w.shape)}")
    if w.dtype != x.dtype:
        raise TypeError(f"weight must have input's dtype {x.dtype} (the matmul runs in it); got {w.dtype}")
    checks.same_device("weight", w, x, "input")
    n_cols, hidden = w.shape
    if x.shape[-1] != hidden:
        raise ValueError(
            f"input's last dimension H = {x.shape[-1]} does not match weight's H = {hidden} "
            f"(input {tuple(x.shape)}, weight {tuple(w.shape)})"
        )
    if b is not None:
        if tuple(b.shape) != (n_cols,):
            raise ValueError(f"bias must have shape (C,) = ({n_cols},) for weight {tuple(w.shape)}; got {tuple(b.shape)}")
        if not b.is_floating_point():
            raise TypeError(f"bias must be floating; got {b.dtype}")
        checks.same_device("bias", b, x, "input")
    p = None
    if pos_weight is not None:
        p = checks.tensor("pos_weight", pos_weight)
        if p.dim() > 1 or (p.dim() == 1 and p.shape[0] not in (1, n_cols)):
            raise ValueError(
                f"pos_weight must have shape (C,) = ({n_cols},) (or (1,) or ()) for weight {tuple(w.shape)}; "
                f"got {tuple(p.shape)}")
        if not p.is_floating_point():
            raise TypeError(f"pos_weight must be floating; got {p.dtype}")
        checks.same_device("pos_weight", p, x, "input")
    z = checks.tensor("target", target)
    checks.same_device("target", z, x, "input")
    batch = tuple(x.shape[:-1])
    dense = positives = None
    n_rows = math.prod(batch)
    if z.dtype == torch.int64:
        if tuple(z.shape) == batch:
            positives = z.reshape(n_rows, 1)
        elif tuple(z.shape[:-1]) == batch and z.dim() == x.dim() and z.shape[-1] < n_cols:
            positives = z.reshape(n_rows, z.shape[-1])
        elif tuple(z.shape[:-1]) == batch and z.dim() == x.dim():
            raise ValueError(
                f"int64 target of shape {tuple(z.shape)} for C = {n_cols} classes is ambiguous: a (B, C) "
                "multi-hot tensor would be read as class ids (every 0 naming class 0). Pass dense labels as "
                "bool, uint8 or float, or class ids as (B, K) with K < C (padded with -1)")
        else:
            raise ValueError(
                f"int64 target (positive classes) must have shape {batch} or {batch + ('K',)} (K < C) for input "
                f"{tuple(x.shape)}; got {tuple(z.shape)}")
    elif z.is_floating_point() or z.dtype in BYTE_LABEL_DTYPES:
        if tuple(z.shape) != batch + (n_cols,):
            raise ValueError(
                f"dense target must have shape {batch + (n_cols,)} (input's rows x C); got target "
                f"{tuple(z.shape)} for input {tuple(x.shape)} and weight {tuple(w.shape)}")
        if z.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "target requires grad, but the fused op does not differentiate its target: use "
                "F.binary_cross_entropy_with_logits(F.linear(input, weight, bias), target) for soft-label gradients")
        dense = z.reshape(n_rows, n_cols)
    else:
        raise TypeError(f"target must be floating, bool or uint8 (dense) or int64 (positive classes); got {z.dtype}")
    if reduction == "none":
        raise ValueError(
            "reduction='none' is not supported: the fused op never holds the (B, C) loss. Use the unfused "
            "F.binary_cross_entropy_with_logits(F.linear(input, weight, bias), target, reduction='none')")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction!r} is not a valid value for reduction: use 'mean' or 'sum'")
    s = checks.label_smoothing(label_smoothing)
    rows = chunk_size_argument(chunk_size)
    smoothing = number_as_tensor(s, x, compute_dtype(x.dtype))
    x2 = x.reshape(n_rows, hidden)
    return routes.linear_loss(x2, w, b, None, dense, positives, p, smoothing, REDUCTIONS[reduction], rows)
