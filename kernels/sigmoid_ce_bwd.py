"""Backward sigmoid cross entropy in one launch: logits and labels gradients
recomputed from the inputs, for any reduction."""

import torch
import triton
import triton.language as tl

from fused_sigxent.core import layout
from fused_sigxent.core import reduction as R
from fused_sigxent.core.plans import PLANS, remember

from . import _grid
from ._launch import Launch, LaunchPlan, aligned
from ._configs import tuned
from ._math import (
    VEC,
    COEF_NONE,
    NONE,
    divide,
    elementwise_launch,
    focal_pointers,
    grid_stride,
    load_block,
    load_scalar,
    focal_parameters,
    smoothing,
    step_rows_classes,
    stepped_indices,
    weighted_loss_and_grads,
)


@triton.jit
def _bwd_block(
    start, row, col, grad_ptr, logits_ptr, labels_ptr, weight_ptr, pos_weight_ptr, w_scalar, pw_scalar,
    grad_logits_ptr, grad_labels_ptr, n_elements, d1, d2, d3, stride_w_0, stride_w_1, stride_w_2, stride_w_3,
    stride_pw_0, stride_pw_1, stride_pw_2, stride_pw_3, s, one_minus_s, scale, gamma, alpha, n_cols,
    REDUCTION: tl.constexpr, W_LAYOUT: tl.constexpr, PW_LAYOUT: tl.constexpr, NDIM: tl.constexpr,
    VEC_WRAPS: tl.constexpr, NEED_GRAD_LOGITS: tl.constexpr, NEED_GRAD_LABELS: tl.constexpr,
    FOCAL: tl.constexpr, HAS_ALPHA: tl.constexpr, HARD_LABELS: tl.constexpr, CLASS_INDEX: tl.constexpr,
    MASKED: tl.constexpr, CT: tl.constexpr, FAST_MATH: tl.constexpr, VEC_: tl.constexpr, BLOCK: tl.constexpr,
):
    """Gradients of one block of BLOCK elements from `start`. MASKED only for
    the ragged tail; `scale` is the incoming gradient over the denominator
    (unused for NONE, whose incoming gradient is read per element); row,
    col: each VEC_-element vector's (row, class) where STEP_CLASSES."""
    lanes, mask, x, z, w, p = load_block(
        start, row, col, logits_ptr, labels_ptr, weight_ptr, pos_weight_ptr, w_scalar, pw_scalar,
        n_elements, d1, d2, d3,
        stride_w_0, stride_w_1, stride_w_2, stride_w_3, stride_pw_0, stride_pw_1, stride_pw_2, stride_pw_3,
        s, n_cols, W_LAYOUT, PW_LAYOUT, NDIM, VEC_WRAPS, CLASS_INDEX, MASKED, CT, VEC_, BLOCK)
    _, d_logits, d_labels = weighted_loss_and_grads(
        x, z, w, p, gamma, alpha, W_LAYOUT != COEF_NONE, PW_LAYOUT != COEF_NONE, FOCAL, HAS_ALPHA, HARD_LABELS,
        CT, FAST_MATH)
    if REDUCTION == NONE:
        scale = tl.load(grad_ptr + start + lanes, mask=mask, other=0).to(CT)
    # Chain rule: times the incoming gradient (over the denominator).
    if NEED_GRAD_LOGITS:
        tl.store(grad_logits_ptr + start + lanes, (d_logits * scale).to(grad_logits_ptr.dtype.element_ty), mask=mask)
    if NEED_GRAD_LABELS:
        d_labels = d_labels * (one_minus_s * scale)
        tl.store(grad_labels_ptr + start + lanes, d_labels.to(grad_labels_ptr.dtype.element_ty), mask=mask)


@tuned("sigmoid_ce_bwd")
@triton.jit(do_not_specialize=["n_elements"])
def _sigmoid_ce_bwd_kernel(
    grad_ptr, logits_ptr, labels_ptr, weight_ptr, pos_weight_ptr, smoothing_ptr, gamma_ptr, alpha_ptr, denom_ptr,
    grad_logits_ptr, grad_labels_ptr,
    n_elements, numel_class, d1, d2, d3, n_cols,
    stride_w_0, stride_w_1, stride_w_2, stride_w_3,
    stride_pw_0, stride_pw_1, stride_pw_2, stride_pw_3,
    REDUCTION: tl.constexpr, W_LAYOUT: tl.constexpr, PW_LAYOUT: tl.constexpr, NDIM: tl.constexpr,
    STEP_CLASSES: tl.constexpr, VEC_WRAPS: tl.constexpr,
    NEED_GRAD_LOGITS: tl.constexpr, NEED_GRAD_LABELS: tl.constexpr,
    FOCAL: tl.constexpr, HAS_ALPHA: tl.constexpr, HARD_LABELS: tl.constexpr, CLASS_INDEX: tl.constexpr,
    INT64: tl.constexpr, CT: tl.constexpr, FAST_MATH: tl.constexpr, BLOCK: tl.constexpr,
):
    """Persistent grid; each program strides over blocks of BLOCK elements.

    grad_ptr: the incoming gradient, [] for a reduced loss, [n_elements]
      (contiguous) for REDUCTION == NONE. denom_ptr: [] the forward's denominator.
    logits_ptr, labels_ptr, weight_ptr, pos_weight_ptr, smoothing_ptr, gamma_ptr, alpha_ptr, d1..d3, n_cols,
      strides, W_LAYOUT, PW_LAYOUT, STEP_CLASSES, VEC_WRAPS, FOCAL, HAS_ALPHA,
      HARD_LABELS, CLASS_INDEX, FAST_MATH: as in
      _sigmoid_ce_fwd_kernel.
    grad_logits_ptr, grad_labels_ptr: [n_elements] outputs, written when NEED_GRAD_*.
    numel_class: the autotune key only.
    """
    first, step, n_full, owns_tail = grid_stride(n_elements, INT64, BLOCK)
    VEC_: tl.constexpr = VEC if STEP_CLASSES else BLOCK
    s = smoothing(smoothing_ptr, CT)
    one_minus_s = 1.0 - s
    gamma, alpha = focal_parameters(gamma_ptr, alpha_ptr, FOCAL, HAS_ALPHA, CT)
    w_scalar = load_scalar(weight_ptr, W_LAYOUT, CT)
    pw_scalar = load_scalar(pos_weight_ptr, PW_LAYOUT, CT)
    if REDUCTION != NONE:
        scale = divide(tl.load(grad_ptr).to(CT), tl.load(denom_ptr).to(CT), REDUCTION)
    else:
        scale = 1.0  # unused: NONE reads its incoming gradient per element
    # The ragged tail block first, masked, by the program whose turn it would
    # be, in quarter blocks (fewer predicates live at a time: no spills); then
    # whole blocks unmasked, so loads and stores stay 16-byte vectors.
    TAIL_BLOCK: tl.constexpr = BLOCK // 4
    TAIL_VEC: tl.constexpr = VEC if STEP_CLASSES else TAIL_BLOCK
    for t in range(tl.where(owns_tail, n_full, n_elements), n_elements, TAIL_BLOCK):
        t_row, t_col, _, _ = stepped_indices(t, step, d3, STEP_CLASSES, TAIL_VEC, TAIL_BLOCK)
        _bwd_block(t, t_row, t_col, grad_ptr, logits_ptr, labels_ptr, weight_ptr, pos_weight_ptr,
                   w_scalar, pw_scalar, grad_logits_ptr, grad_labels_ptr, n_elements, d1, d2, d3,
                   stride_w_0, stride_w_1, stride_w_2, stride_w_3, stride_pw_0, stride_pw_1, stride_pw_2, stride_pw_3,
                   s, one_minus_s, scale, gamma, alpha, n_cols, REDUCTION, W_LAYOUT, PW_LAYOUT, NDIM, VEC_WRAPS,
                   NEED_GRAD_LOGITS, NEED_GRAD_LABELS, FOCAL, HAS_ALPHA, HARD_LABELS, CLASS_INDEX,
                   True, CT, FAST_MATH, TAIL_VEC, TAIL_BLOCK)
    row, col, d_row, d_col = stepped_indices(first, step, d3, STEP_CLASSES, VEC_, BLOCK)
    for start in range(first, n_full, step):
        _bwd_block(start, row, col, grad_ptr, logits_ptr, labels_ptr, weight_ptr, pos_weight_ptr,
                   w_scalar, pw_scalar, grad_logits_ptr, grad_labels_ptr, n_elements, d1, d2, d3,
                   stride_w_0, stride_w_1, stride_w_2, stride_w_3, stride_pw_0, stride_pw_1, stride_pw_2, stride_pw_3,
                   s, one_minus_s, scale, gamma, alpha, n_cols, REDUCTION, W_LAYOUT, PW_LAYOUT, NDIM, VEC_WRAPS,
                   NEED_GRAD_LOGITS, NEED_GRAD_LABELS, FOCAL, HAS_ALPHA, HARD_LABELS, CLASS_INDEX,
                   False, CT, FAST_MATH, VEC_, BLOCK)
        if STEP_CLASSES:
            row, col = step_rows_classes(row, col, d_row, d_col, d3)


def sigmoid_ce_bwd(
    grad: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    denom: torch.Tensor,
    label_smoothing: torch.Tensor,
    reduction: int,
    need_grad_logits: bool,
    need_grad_labels: bool,
    gamma: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    hard_labels: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op `fused_sigxent::sigmoid_ce_bwd` on validated tensors; same
    contract as `_reference.sigmoid_ce_bwd`."""
    x, z = layout.contiguous(logits), layout.contiguous(labels)
    device = x.device
    # An expanded incoming gradient (loss.sum().backward() gives one) is made
    # contiguous here: the kernel reads it at the logits' offsets.
    g = layout.contiguous(grad) if reduction == R.NONE else grad
    grad_logits = torch.empty_like(x) if need_grad_logits else torch.empty(0, dtype=logits.dtype, device=device)
    grad_labels = (_grid.empty_as(z, labels.dtype) if need_grad_labels
                   else torch.empty(0, dtype=labels.dtype, device=device))
    if x.numel() == 0 or not (need_grad_logits or need_grad_labels):
        return grad_logits, grad_labels
    # Everything the launch depends on but the tensors' addresses (see kernels/_launch.py).
    key = ("sigmoid_ce_bwd", x.shape, x.dtype, z.dtype, labels.dtype, device, aligned(x), aligned(z), reduction,
           need_grad_logits, need_grad_labels, hard_labels, g.dtype, aligned(g), layout.signature(weight),
           layout.signature(pos_weight), layout.signature(denom), layout.signature(label_smoothing), layout.signature(gamma), layout.signature(alpha))
    plan = PLANS.get(key)
    if plan is None:
        plan = remember(key, _plan(x, z, weight, pos_weight, reduction, need_grad_logits, need_grad_labels,
                                   gamma, alpha, hard_labels))
    launch, collapsed = plan
    w, pw = (weight, pos_weight) if collapsed is None else collapsed(weight, pos_weight)
    launch(
        g, x, z, x if w is None else w, x if pw is None else pw, label_smoothing,
        *focal_pointers(label_smoothing, gamma, alpha), denom,
        grad_logits if need_grad_logits else x, grad_labels if need_grad_labels else x,
    )
    return grad_logits, grad_labels


def _plan(x, z, weight, pos_weight, reduction, need_grad_logits, need_grad_labels, gamma, alpha,
          hard_labels) -> LaunchPlan:
    """The launch plan of every call with this call's signature."""
    scalars, flags, collapsed = elementwise_launch("sigmoid_ce_bwd", x, z, weight, pos_weight, gamma, alpha,
                                                   hard_labels)
    launch = Launch(
        _sigmoid_ce_bwd_kernel, _grid.persistent_grid(x.numel(), x.device), scalars,
        dict(REDUCTION=reduction, NEED_GRAD_LOGITS=need_grad_logits, NEED_GRAD_LABELS=need_grad_labels, **flags),
    )
    return LaunchPlan(launch, collapsed)
