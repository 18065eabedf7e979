"""Forward sigmoid cross entropy in one launch: elementwise loss or its
reduction (with the denominator), and, when asked, the final gradients."""

import torch
import triton
import triton.language as tl

from fused_sigxent.core import layout
from fused_sigxent.core import reduction as R
from fused_sigxent.core.dtypes import compute_dtype
from fused_sigxent.core.plans import PLANS, remember

from . import _grid
from ._launch import Launch, aligned
from ._configs import tuned
from ._math import (
    VEC,
    COEF_NONE,
    COEF_SCALAR,
    MEAN_BY_NONZERO,
    MEAN_BY_WEIGHTS,
    NONE,
    SUM,
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
    total_of,
    weighted_loss_and_grads,
)


@triton.jit
def _fwd_block(
    start, row, col, logits_ptr, labels_ptr, weight_ptr, pos_weight_ptr, w_scalar, pw_scalar,
    loss_ptr, grad_logits_ptr, grad_labels_ptr,
    n_elements, d1, d2, d3, stride_w_0, stride_w_1, stride_w_2, stride_w_3,
    stride_pw_0, stride_pw_1, stride_pw_2, stride_pw_3, s, one_minus_s, grad_scale, gamma, alpha, n_cols,
    acc_loss, acc_weight, acc_nonzero,
    REDUCTION: tl.constexpr, W_LAYOUT: tl.constexpr, PW_LAYOUT: tl.constexpr, COUNT_WEIGHTS: tl.constexpr,
    NDIM: tl.constexpr, VEC_WRAPS: tl.constexpr, WRITE_GRAD_LOGITS: tl.constexpr, WRITE_GRAD_LABELS: tl.constexpr,
    FOCAL: tl.constexpr, HAS_ALPHA: tl.constexpr, HARD_LABELS: tl.constexpr, CLASS_INDEX: tl.constexpr,
    MASKED: tl.constexpr, CT: tl.constexpr, FAST_MATH: tl.constexpr, VEC_: tl.constexpr, BLOCK: tl.constexpr,
):
    """One block of BLOCK elements from `start`: stores what the forward writes
    and returns the running sums. MASKED only for the ragged tail block; row,
    col: each VEC_-element vector's (row, class) where STEP_CLASSES."""
    lanes, mask, x, z, w, p = load_block(
        start, row, col, logits_ptr, labels_ptr, weight_ptr, pos_weight_ptr, w_scalar, pw_scalar,
        n_elements, d1, d2, d3,
        stride_w_0, stride_w_1, stride_w_2, stride_w_3, stride_pw_0, stride_pw_1, stride_pw_2, stride_pw_3,
        s, n_cols, W_LAYOUT, PW_LAYOUT, NDIM, VEC_WRAPS, CLASS_INDEX, MASKED, CT, VEC_, BLOCK)
    # Loss and gradients (stable forms in _math.loss_and_grads).
    loss, d_logits, d_labels = weighted_loss_and_grads(
        x, z, w, p, gamma, alpha, W_LAYOUT != COEF_NONE, PW_LAYOUT != COEF_NONE, FOCAL, HAS_ALPHA, HARD_LABELS,
        CT, FAST_MATH)
    if COUNT_WEIGHTS:
        # Masked weights load as 0: they add nothing to either sum.
        acc_weight += w
        acc_nonzero += (w != 0).to(CT)
    # Elementwise loss out, or into this program's running sum.
    if REDUCTION == NONE:
        tl.store(loss_ptr + start + lanes, loss.to(loss_ptr.dtype.element_ty), mask=mask)
    else:
        if MASKED:
            loss = tl.where(mask, loss, 0.0)
        acc_loss += loss
    if WRITE_GRAD_LOGITS:
        d_logits = d_logits * grad_scale
        tl.store(grad_logits_ptr + start + lanes, d_logits.to(grad_logits_ptr.dtype.element_ty), mask=mask)
    if WRITE_GRAD_LABELS:
        d_labels = d_labels * (one_minus_s * grad_scale)
        tl.store(grad_labels_ptr + start + lanes, d_labels.to(grad_labels_ptr.dtype.element_ty), mask=mask)
    return acc_loss, acc_weight, acc_nonzero


# grad_logits_out may be the logits (the linear engine's chunks).
@tuned("sigmoid_ce_fwd", overwrites={"grad_logits_ptr": "logits_ptr"})
@triton.jit(do_not_specialize=["n_elements"])
def _sigmoid_ce_fwd_kernel(
    logits_ptr, labels_ptr, weight_ptr, pos_weight_ptr, smoothing_ptr, gamma_ptr, alpha_ptr,
    loss_ptr, denom_ptr, grad_logits_ptr, grad_labels_ptr, partials_ptr, ticket_ptr,
    n_elements, numel_class, d1, d2, d3, n_cols,
    stride_w_0, stride_w_1, stride_w_2, stride_w_3,
    stride_pw_0, stride_pw_1, stride_pw_2, stride_pw_3,
    REDUCTION: tl.constexpr, W_LAYOUT: tl.constexpr, PW_LAYOUT: tl.constexpr, NDIM: tl.constexpr,
    STEP_CLASSES: tl.constexpr, VEC_WRAPS: tl.constexpr,
    WRITE_GRAD_LOGITS: tl.constexpr, WRITE_GRAD_LABELS: tl.constexpr,
    FOCAL: tl.constexpr, HAS_ALPHA: tl.constexpr, HARD_LABELS: tl.constexpr, CLASS_INDEX: tl.constexpr,
    INT64: tl.constexpr, MAX_PROGRAMS: tl.constexpr, CT: tl.constexpr, FAST_MATH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Persistent grid; each program strides over blocks of BLOCK elements.

    logits_ptr, labels_ptr: [n_elements] contiguous (labels of any floating
      dtype, or uint8). weight_ptr, pos_weight_ptr: broadcast coefficients read
      through strides stride_w_*, stride_pw_* over the collapsed logits shape
      (d0, d1, d2, d3), NDIM of them used (fused_sigxent/core/layout.py), as W_LAYOUT and
      PW_LAYOUT say (_math.COEF_*; COEF_NONE: absent).
    smoothing_ptr: [] the label smoothing, in CT. gamma_ptr, alpha_ptr: [] the
      focal loss's gamma and alpha, in CT, read where FOCAL (and HAS_ALPHA).
    n_cols: the logits' last dimension, read where CLASS_INDEX (labels_ptr
      then holds [n_elements / n_cols] int64 class indices, read as one-hot rows).
    FOCAL: the focal loss instead of the cross entropy; HAS_ALPHA:
      its alpha_t factor; HARD_LABELS: smoothed labels known to be 0 or 1 (a
      cheaper focal factor, _math.focal_hard_labels).
    loss_ptr: [n_elements] for REDUCTION == NONE, else [] (the reduced loss).
    denom_ptr: [] the denominator, in CT. grad_logits_ptr, grad_labels_ptr:
      [n_elements] final gradients for an incoming gradient of 1, written when
      WRITE_GRAD_* (only with a denominator known before the sum ends).
    partials_ptr: [3, MAX_PROGRAMS] per-program sums (loss, weight, nonzero
      weights); ticket_ptr: [1] int32 arrival counter, 0 on entry and on exit.
    numel_class: the autotune key only.
    REDUCTION: an op reduction code. STEP_CLASSES: each _math.VEC-element
      vector's (row, class) index over (d2, d3) is stepped along the grid
      stride, no division per element; VEC_WRAPS: how many row ends a vector
      can cross (0: VEC divides d3). FAST_MATH: the SFU's approximate exp2
      and reciprocal (float32, compiled: not under the interpreter).
    """
    first, step, n_full, owns_tail = grid_stride(n_elements, INT64, BLOCK)
    HAS_WEIGHT: tl.constexpr = W_LAYOUT != COEF_NONE
    SCALAR_WEIGHT: tl.constexpr = W_LAYOUT == COEF_SCALAR
    COUNT_WEIGHTS: tl.constexpr = HAS_WEIGHT and not SCALAR_WEIGHT and (
        REDUCTION == MEAN_BY_WEIGHTS or REDUCTION == MEAN_BY_NONZERO)
    # Vectors of VEC consecutive elements where coefficients are stepped over
    # (rows, classes); else the block is one vector (a plain 1-D block).
    VEC_: tl.constexpr = VEC if STEP_CLASSES else BLOCK
    s = smoothing(smoothing_ptr, CT)
    one_minus_s = 1.0 - s
    gamma, alpha = focal_parameters(gamma_ptr, alpha_ptr, FOCAL, HAS_ALPHA, CT)
    w_scalar = load_scalar(weight_ptr, W_LAYOUT, CT)
    pw_scalar = load_scalar(pos_weight_ptr, PW_LAYOUT, CT)

    # The denominator, where no pass over a weight tensor is needed to know it.
    n_float = n_elements.to(CT)
    if REDUCTION == SUM:
        static_denom = tl.full([], 1.0, CT)
    elif SCALAR_WEIGHT and REDUCTION == MEAN_BY_WEIGHTS:
        static_denom = w_scalar * n_float
    elif SCALAR_WEIGHT and REDUCTION == MEAN_BY_NONZERO:
        static_denom = tl.where(w_scalar != 0, n_float, 0.0)
    else:
        static_denom = n_float
    grad_scale = divide(tl.full([], 1.0, CT), static_denom, REDUCTION)

    # The ragged tail block first, masked, by the program whose turn it would
    # be, in quarter blocks (a masked access holds a predicate per element:
    # fewer at a time, no spills), with running sums of its own. Then whole
    # blocks unmasked, so loads and stores stay 16-byte vectors.
    TAIL_BLOCK: tl.constexpr = BLOCK // 4
    TAIL_VEC: tl.constexpr = VEC if STEP_CLASSES else TAIL_BLOCK
    tail_loss = tl.zeros([TAIL_BLOCK // TAIL_VEC, TAIL_VEC], CT)
    tail_weight = tl.zeros([TAIL_BLOCK // TAIL_VEC, TAIL_VEC], CT)
    tail_nonzero = tl.zeros([TAIL_BLOCK // TAIL_VEC, TAIL_VEC], CT)
    for t in range(tl.where(owns_tail, n_full, n_elements), n_elements, TAIL_BLOCK):
        t_row, t_col, _, _ = stepped_indices(t, step, d3, STEP_CLASSES, TAIL_VEC, TAIL_BLOCK)
        tail_loss, tail_weight, tail_nonzero = _fwd_block(
            t, t_row, t_col, logits_ptr, labels_ptr, weight_ptr, pos_weight_ptr, w_scalar, pw_scalar,
            loss_ptr, grad_logits_ptr, grad_labels_ptr,
            n_elements, d1, d2, d3, stride_w_0, stride_w_1, stride_w_2, stride_w_3,
            stride_pw_0, stride_pw_1, stride_pw_2, stride_pw_3, s, one_minus_s, grad_scale, gamma, alpha, n_cols,
            tail_loss, tail_weight, tail_nonzero, REDUCTION, W_LAYOUT, PW_LAYOUT, COUNT_WEIGHTS, NDIM, VEC_WRAPS,
            WRITE_GRAD_LOGITS, WRITE_GRAD_LABELS, FOCAL, HAS_ALPHA, HARD_LABELS, CLASS_INDEX, True, CT, FAST_MATH, TAIL_VEC, TAIL_BLOCK)
    acc_loss = tl.zeros([BLOCK // VEC_, VEC_], CT)
    acc_weight = tl.zeros([BLOCK // VEC_, VEC_], CT)
    acc_nonzero = tl.zeros([BLOCK // VEC_, VEC_], CT)
    row, col, d_row, d_col = stepped_indices(first, step, d3, STEP_CLASSES, VEC_, BLOCK)
    for start in range(first, n_full, step):
        acc_loss, acc_weight, acc_nonzero = _fwd_block(
            start, row, col, logits_ptr, labels_ptr, weight_ptr, pos_weight_ptr, w_scalar, pw_scalar,
            loss_ptr, grad_logits_ptr, grad_labels_ptr,
            n_elements, d1, d2, d3, stride_w_0, stride_w_1, stride_w_2, stride_w_3,
            stride_pw_0, stride_pw_1, stride_pw_2, stride_pw_3, s, one_minus_s, grad_scale, gamma, alpha, n_cols,
            acc_loss, acc_weight, acc_nonzero, REDUCTION, W_LAYOUT, PW_LAYOUT, COUNT_WEIGHTS, NDIM, VEC_WRAPS,
            WRITE_GRAD_LOGITS, WRITE_GRAD_LABELS, FOCAL, HAS_ALPHA, HARD_LABELS, CLASS_INDEX,
            False, CT, FAST_MATH, VEC_, BLOCK)
        if STEP_CLASSES:
            row, col = step_rows_classes(row, col, d_row, d_col, d3)

    if REDUCTION == NONE:
        if tl.program_id(0) == 0:
            tl.store(denom_ptr, tl.full([], 1.0, CT))
    else:
        # Deterministic reduction: per-program partials, then the last program
        # to arrive sums them in program order and resets the ticket.
        pid = tl.program_id(0)
        n_programs = tl.num_programs(0)
        tl.store(partials_ptr + pid, total_of(tail_loss) + total_of(acc_loss))
        if COUNT_WEIGHTS:
            tl.store(partials_ptr + MAX_PROGRAMS + pid, total_of(tail_weight) + total_of(acc_weight))
            tl.store(partials_ptr + 2 * MAX_PROGRAMS + pid, total_of(tail_nonzero) + total_of(acc_nonzero))
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        if ticket == n_programs - 1:
            idx = tl.arange(0, MAX_PROGRAMS)
            live = idx < n_programs
            total = tl.sum(tl.load(partials_ptr + idx, mask=live, other=0, volatile=True), axis=0)
            denom = static_denom
            if COUNT_WEIGHTS:
                if REDUCTION == MEAN_BY_WEIGHTS:
                    denom_ptrs = partials_ptr + MAX_PROGRAMS + idx
                else:
                    denom_ptrs = partials_ptr + 2 * MAX_PROGRAMS + idx
                denom = tl.sum(tl.load(denom_ptrs, mask=live, other=0, volatile=True), axis=0)
            tl.store(loss_ptr, divide(total, denom, REDUCTION).to(loss_ptr.dtype.element_ty))
            tl.store(denom_ptr, denom)
            tl.atomic_xchg(ticket_ptr, 0)


def sigmoid_ce_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    label_smoothing: torch.Tensor,
    reduction: int,
    out_dtype: torch.dtype,
    grad_logits_in_fwd: bool,
    grad_labels_in_fwd: bool,
    gamma: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    hard_labels: bool = False,
    *,
    grad_logits_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op `fused_sigxent::sigmoid_ce_fwd` on validated tensors; same
    contract as `_reference.sigmoid_ce_fwd`. grad_logits_out may be the
    (contiguous) logits themselves: each element's gradient is stored by
    the program that loaded its logit, after that load and from its value."""
    if grad_logits_out is not None and not (grad_logits_out.is_contiguous() and grad_logits_out.shape == logits.shape):
        raise ValueError(f"grad_logits_out must be contiguous and of the logits' shape {tuple(logits.shape)}")
    x, z = layout.contiguous(logits), layout.contiguous(labels)
    run = plan(x, z, labels.dtype, weight, pos_weight, label_smoothing, reduction, out_dtype, grad_logits_in_fwd,
               grad_labels_in_fwd, gamma, alpha, hard_labels, grad_logits_out)
    return run(x, z, weight, pos_weight, label_smoothing, gamma, alpha, grad_logits_out)


def plan(x, z, labels_dtype, weight, pos_weight, label_smoothing, reduction, out_dtype, grad_logits_in_fwd,
         grad_labels_in_fwd, gamma=None, alpha=None, hard_labels=False,
         grad_logits_out=None) -> "ForwardLaunchPlan":
    """The launch plan of every call with this call's signature (x, z: the
    contiguous logits and labels, as `layout.contiguous` makes them)."""
    # Everything the launch depends on but the tensors' addresses (see kernels/_launch.py).
    key = ("sigmoid_ce_fwd", x.shape, x.dtype, z.dtype, labels_dtype, x.device, aligned(x), aligned(z), reduction,
           out_dtype, grad_logits_in_fwd, grad_labels_in_fwd, hard_labels, layout.signature(weight), layout.signature(pos_weight),
           layout.signature(label_smoothing), layout.signature(gamma), layout.signature(alpha), layout.signature(grad_logits_out))
    made = PLANS.get(key)
    if made is None:
        made = remember(key, ForwardLaunchPlan(x, z, labels_dtype, weight, pos_weight, reduction, out_dtype,
                                               grad_logits_in_fwd, grad_labels_in_fwd, gamma, alpha, hard_labels))
    return made


class ForwardLaunchPlan:
    """A forward launch with everything but the tensors' addresses worked
    out: the Launch; templates of the reduced loss (None: elementwise,
    shaped as the logits), the denominator and the 0-size gradients not
    written; the coefficient materializer (`layout.collapse_plan`) or None."""

    __slots__ = ("launch", "loss_like", "denom_like", "no_grad_logits", "no_grad_labels", "collapsed",
                 "grad_logits_in_fwd", "grad_labels_in_fwd", "out_dtype", "labels_dtype", "device", "ct")

    def __init__(self, x, z, labels_dtype, weight, pos_weight, reduction, out_dtype, grad_logits_in_fwd,
                 grad_labels_in_fwd, gamma, alpha, hard_labels):
        device = x.device
        ct = compute_dtype(x.dtype)
        if (grad_logits_in_fwd or grad_labels_in_fwd) and not R.denominator_is_static(
                reduction, None if weight is None else weight.numel()):
            raise ValueError("gradients in the forward need a denominator known before the reduction")
        scalars, flags, self.collapsed = elementwise_launch("sigmoid_ce_fwd", x, z, weight, pos_weight, gamma,
                                                            alpha, hard_labels)
        self.launch = Launch(
            _sigmoid_ce_fwd_kernel, _grid.persistent_grid(x.numel(), device), scalars,
            dict(REDUCTION=reduction, WRITE_GRAD_LOGITS=grad_logits_in_fwd, WRITE_GRAD_LABELS=grad_labels_in_fwd,
                 MAX_PROGRAMS=_grid.partial_slots(device), **flags),
        )
        self.loss_like = None if reduction == R.NONE else _grid.template(device, out_dtype)
        self.denom_like = _grid.template(device, ct)
        self.no_grad_logits = _grid.template(device, x.dtype, empty=True)
        self.no_grad_labels = _grid.template(device, labels_dtype, empty=True)
        self.grad_logits_in_fwd, self.grad_labels_in_fwd = grad_logits_in_fwd, grad_labels_in_fwd
        self.out_dtype, self.labels_dtype = out_dtype, labels_dtype
        self.device, self.ct = device, ct

    def __call__(self, x, z, weight, pos_weight, label_smoothing, gamma=None, alpha=None, grad_logits_out=None,
                 denom=None, fresh=True):
        """(loss, denom, grad_logits, grad_labels) of one call, fresh tensors
        each (the op's contract). A caller that keeps the outputs to itself
        (a call plan, `fused_sigxent/op/routes.py`) may pass a 0-d tensor of the compute dtype
        to write the denominator into, and fresh=False: the gradients not
        asked for are then this plan's 0-size templates."""
        w, pw = (weight, pos_weight) if self.collapsed is None else self.collapsed(weight, pos_weight)
        loss = _grid.empty_as(x, self.out_dtype) if self.loss_like is None else torch.empty_like(self.loss_like)
        grad_logits_in_fwd, grad_labels_in_fwd = self.grad_logits_in_fwd, self.grad_labels_in_fwd
        if denom is None:
            denom = torch.empty_like(self.denom_like)
        if fresh:
            no_grad_logits = torch.empty_like(self.no_grad_logits)
            no_grad_labels = torch.empty_like(self.no_grad_labels)
        else:
            no_grad_logits, no_grad_labels = self.no_grad_logits, self.no_grad_labels
        if grad_logits_out is not None:
            grad_logits = grad_logits_out
        else:
            grad_logits = torch.empty_like(x) if grad_logits_in_fwd else no_grad_logits
        grad_labels = _grid.empty_as(z, self.labels_dtype) if grad_labels_in_fwd else no_grad_labels
        ticket, partials = _grid.workspace(self.device, self.ct)
        self.launch(
            x, z, x if w is None else w, x if pw is None else pw, label_smoothing,
            *focal_pointers(label_smoothing, gamma, alpha), loss, denom,
            grad_logits if grad_logits_in_fwd else loss, grad_labels if grad_labels_in_fwd else loss, partials,
            ticket,
        )
        return loss, denom, grad_logits, grad_labels
