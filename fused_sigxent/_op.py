"""Every torch.library registration of fused_sigxent, and the one entry that
all front ends call (`sigmoid_ce`)."""

import torch
from torch import Tensor

from . import _backend, _reference
from . import _reduction as R


def _kernels():
    # Imported on first use: Triton reads TRITON_INTERPRET when a kernel is
    # decorated, so importing late lets a process choose it before the first call.
    from fused_sigxent.kernels import sigmoid_ce_bwd, sigmoid_ce_fwd, sigmoid_ce_scale

    return sigmoid_ce_fwd, sigmoid_ce_bwd, sigmoid_ce_scale


@torch.library.custom_op("fused_sigxent::sigmoid_ce_fwd", mutates_args=())
def sigmoid_ce_fwd(
    logits: Tensor,
    labels: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    label_smoothing: float,
    reduction: int,
    out_dtype: torch.dtype,
    grad_logits_in_fwd: bool,
    grad_labels_in_fwd: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, denominator, grad_logits, grad_labels): see `_reference.sigmoid_ce_fwd`."""
    impl = _kernels()[0].sigmoid_ce_fwd if _backend.use_kernels(logits.device) else _reference.sigmoid_ce_fwd
    return impl(
        logits, labels, weight, pos_weight, label_smoothing, reduction, out_dtype,
        grad_logits_in_fwd, grad_labels_in_fwd,
    )


@sigmoid_ce_fwd.register_fake
def _(logits, labels, weight, pos_weight, label_smoothing, reduction, out_dtype,
      grad_logits_in_fwd, grad_labels_in_fwd):
    loss_shape = logits.shape if reduction == R.NONE else ()
    ct = _reference.compute_dtype(logits.dtype)
    return (
        logits.new_empty(loss_shape, dtype=out_dtype),
        logits.new_empty((), dtype=ct),
        logits.new_empty(logits.shape if grad_logits_in_fwd else (0,)),
        labels.new_empty(labels.shape if grad_labels_in_fwd else (0,)),
    )


@torch.library.custom_op("fused_sigxent::sigmoid_ce_bwd", mutates_args=())
def sigmoid_ce_bwd(
    grad: Tensor,
    logits: Tensor,
    labels: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    denom: Tensor,
    label_smoothing: float,
    reduction: int,
    need_grad_logits: bool,
    need_grad_labels: bool,
) -> tuple[Tensor, Tensor]:
    """(grad_logits, grad_labels) recomputed from the inputs: see `_reference.sigmoid_ce_bwd`."""
    impl = _kernels()[1].sigmoid_ce_bwd if _backend.use_kernels(logits.device) else _reference.sigmoid_ce_bwd
    return impl(
        grad, logits, labels, weight, pos_weight, denom, label_smoothing, reduction,
        need_grad_logits, need_grad_labels,
    )


@sigmoid_ce_bwd.register_fake
def _(grad, logits, labels, weight, pos_weight, denom, label_smoothing, reduction,
      need_grad_logits, need_grad_labels):
    return (
        logits.new_empty(logits.shape if need_grad_logits else (0,)),
        labels.new_empty(labels.shape if need_grad_labels else (0,)),
    )


@torch.library.custom_op("fused_sigxent::sigmoid_ce_scale_", mutates_args=("grad_logits", "grad_labels"))
def sigmoid_ce_scale_(grad: Tensor, grad_logits: Tensor, grad_labels: Tensor) -> None:
    """Multiplies, in place, gradients the forward wrote by the incoming gradient."""
    impl = _kernels()[2].sigmoid_ce_scale_ if _backend.use_kernels(grad_logits.device) else _reference.sigmoid_ce_scale_
    impl(grad, grad_logits, grad_labels)


@sigmoid_ce_scale_.register_fake
def _(grad, grad_logits, grad_labels):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, weight, pos_weight, label_smoothing, reduction, _, grad_logits_in_fwd, grad_labels_in_fwd = inputs
    _, denom, grad_logits, grad_labels = output
    ctx.mark_non_differentiable(denom, grad_logits, grad_labels)
    ctx.save_for_backward(logits, labels, weight, pos_weight, denom, grad_logits, grad_labels)
    ctx.label_smoothing, ctx.reduction = label_smoothing, reduction
    # True until a backward has scaled the forward's gradients in place.
    ctx.grads_from_fwd = grad_logits_in_fwd or grad_labels_in_fwd


def _backward(ctx, grad, _grad_denom, _grad_grad_logits, _grad_grad_labels):
    logits, labels, weight, pos_weight, denom, grad_logits, grad_labels = ctx.saved_tensors
    need_logits, need_labels, need_weight, need_pos_weight = ctx.needs_input_grad[:4]
    if not (need_logits or need_labels):
        grad_logits = grad_labels = None
    elif ctx.grads_from_fwd:
        # Scaled in place through .data, which leaves the saved tensors'
        # version alone; a second backward through this graph
        # (retain_graph=True, gradcheck) finds the flag down and recomputes.
        ctx.grads_from_fwd = False
        torch.ops.fused_sigxent.sigmoid_ce_scale_(grad, grad_logits.data, grad_labels.data)
    else:
        grad_logits, grad_labels = torch.ops.fused_sigxent.sigmoid_ce_bwd(
            grad, logits, labels, weight, pos_weight, denom, ctx.label_smoothing, ctx.reduction,
            need_logits, need_labels,
        )
    grad_weight = grad_pos_weight = None
    if need_weight or need_pos_weight:
        grad_weight, grad_pos_weight = _reference.sigmoid_ce_param_grads(
            grad, logits, labels, weight, pos_weight, denom, ctx.label_smoothing, ctx.reduction,
            need_weight, need_pos_weight,
        )
    return (
        grad_logits if need_logits else None,
        grad_labels if need_labels else None,
        grad_weight,
        grad_pos_weight,
        None, None, None, None, None,
    )


sigmoid_ce_fwd.register_autograd(_backward, setup_context=_setup_context)


def plan_grads_in_forward(logits: Tensor, labels: Tensor, weight: Tensor | None, reduction: int) -> tuple[bool, bool]:
    """Whether the forward writes the final logits/labels gradients.

    Bytes per element, with e_x, e_z the logits and labels sizes, for a
    training step (forward + backward) of a reduced loss:
      - gradient in the forward: read x, z, write dx once (e_x + e_z + e_x);
        the backward reads one scalar and returns when it is 1, else reads
        and writes dx again (+ 2 e_x).
      - recompute in the backward: the forward reads x, z; the backward reads
        them again and writes dx (2 e_x + 2 e_z + e_x).
    So the forward writes the gradient whenever one will be needed and its
    scale is known before the reduction ends (`denominator_is_static`). For
    NONE the incoming gradient is a full tensor, so there is nothing to save.
    """
    if reduction == R.NONE or not torch.is_grad_enabled():
        return False, False
    if not R.denominator_is_static(reduction, None if weight is None else weight.numel()):
        return False, False
    return logits.requires_grad, labels.requires_grad


def sigmoid_ce(
    logits: Tensor,
    labels: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    label_smoothing: float,
    reduction: int,
    out_dtype: torch.dtype,
) -> Tensor:
    """The loss, through the op, for arguments a front end has validated."""
    grad_logits_in_fwd, grad_labels_in_fwd = plan_grads_in_forward(logits, labels, weight, reduction)
    loss, _, _, _ = torch.ops.fused_sigxent.sigmoid_ce_fwd(
        logits, labels, weight, pos_weight, float(label_smoothing), reduction, out_dtype,
        grad_logits_in_fwd, grad_labels_in_fwd,
    )
    return loss
