"""Backward of a loss whose forward wrote the gradients: scale them in place
by the incoming gradient, or return at once when it is exactly 1."""

import torch
import triton
import triton.language as tl

from fused_sigxent.core.dtypes import compute_dtype
from fused_sigxent.core.plans import PLANS, remember

from . import _grid
from ._launch import Launch, LaunchPlan, aligned
from ._configs import fixed, numel_class
from ._math import block_mask, grid_stride


@triton.jit
def _scale_block(start, g, grad_logits_ptr, grad_labels_ptr, n_elements,
                 HAS_GRAD_LOGITS: tl.constexpr, HAS_GRAD_LABELS: tl.constexpr,
                 MASKED: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr):
    """Scales one block of BLOCK elements from `start` by g, in place."""
    offs = start + tl.arange(0, BLOCK)
    mask = block_mask(offs, n_elements, MASKED, BLOCK)
    if HAS_GRAD_LOGITS:
        d = tl.load(grad_logits_ptr + offs, mask=mask).to(CT) * g
        tl.store(grad_logits_ptr + offs, d.to(grad_logits_ptr.dtype.element_ty), mask=mask)
    if HAS_GRAD_LABELS:
        d = tl.load(grad_labels_ptr + offs, mask=mask).to(CT) * g
        tl.store(grad_labels_ptr + offs, d.to(grad_labels_ptr.dtype.element_ty), mask=mask)


@fixed("sigmoid_ce_scale")
@triton.jit(do_not_specialize=["n_elements"])
def _sigmoid_ce_scale_kernel(
    grad_ptr, grad_logits_ptr, grad_labels_ptr,
    n_elements, numel_class,
    HAS_GRAD_LOGITS: tl.constexpr, HAS_GRAD_LABELS: tl.constexpr,
    INT64: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr,
):
    """Persistent grid. grad_ptr: [] the incoming gradient (read on the device:
    no host sync decides the skip). grad_logits_ptr, grad_labels_ptr:
    [n_elements] gradients for an incoming gradient of 1, scaled in place
    where HAS_GRAD_*. numel_class: picks the fixed config (configs/)."""
    g = tl.load(grad_ptr).to(CT)
    # The common case (loss.backward() on the loss itself): nothing to do.
    if g != 1.0:
        # Whole blocks unmasked (16-byte vectors); the ragged tail block masked.
        first, step, n_full, owns_tail = grid_stride(n_elements, INT64, BLOCK)
        for start in range(first, n_full, step):
            _scale_block(start, g, grad_logits_ptr, grad_labels_ptr, n_elements,
                         HAS_GRAD_LOGITS, HAS_GRAD_LABELS, False, CT, BLOCK)
        if owns_tail:
            _scale_block(n_full, g, grad_logits_ptr, grad_labels_ptr, n_elements,
                         HAS_GRAD_LOGITS, HAS_GRAD_LABELS, True, CT, BLOCK)


def sigmoid_ce_scale_(grad: torch.Tensor, grad_logits: torch.Tensor, grad_labels: torch.Tensor) -> None:
    """The op `fused_sigxent::sigmoid_ce_scale_`: same contract as
    `_reference.sigmoid_ce_scale_`. Both gradients are contiguous (the forward
    allocated them); an empty one is left alone."""
    n_logits, n_labels = grad_logits.numel(), grad_labels.numel()
    if n_logits == 0 and n_labels == 0:
        return
    key = ("sigmoid_ce_scale_", n_logits, n_labels, grad_logits.dtype, grad_labels.dtype, grad.dtype, grad.device,
           aligned(grad), aligned(grad_logits), aligned(grad_labels))
    plan = PLANS.get(key)
    if plan is None:
        plan = remember(key, LaunchPlan(_plan(grad, grad_logits, grad_labels)))
    plan.launch(grad, grad_logits if n_logits else grad_labels, grad_labels if n_labels else grad_logits)


def _plan(grad, grad_logits, grad_labels) -> Launch:
    has_logits, has_labels = grad_logits.numel() > 0, grad_labels.numel() > 0
    n = max(grad_logits.numel(), grad_labels.numel())
    dtype = grad_logits.dtype if has_logits else grad_labels.dtype
    return Launch(
        _sigmoid_ce_scale_kernel, _grid.persistent_grid(n, grad.device), (n, numel_class("sigmoid_ce_scale", n)),
        dict(HAS_GRAD_LOGITS=has_logits, HAS_GRAD_LABELS=has_labels, INT64=n >= _grid.INT32_LIMIT,
             CT=tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32),
    )
