"""Every torch.library registration of fused_sigxent: the loss ops
(`sigmoid_ce_fwd`, `sigmoid_ce_bwd`, `sigmoid_ce_scale_`) and the chunked
linear op (`linear_sigmoid_ce`), each with its fake implementation and its
derivatives (`op/derivatives.py`). Each op's body is one implementation's
function (`impl.run`: the backend's, for the tensors' device)."""

import torch
from torch import Tensor

from .. import impl
from ..core import reduction as R
from ..core.dtypes import compute_dtype
from ..impl import chunked
from . import derivatives


@torch.library.custom_op("fused_sigxent::sigmoid_ce_fwd", mutates_args=())
def sigmoid_ce_fwd(
    logits: Tensor,
    labels: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    label_smoothing: Tensor,
    reduction: int,
    out_dtype: torch.dtype,
    grad_logits_in_fwd: bool,
    grad_labels_in_fwd: bool,
    gamma: Tensor | None = None,
    alpha: Tensor | None = None,
    hard_labels: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, denominator, grad_logits, grad_labels): see `impl.Implementation`.
    gamma (0-d) makes it the focal loss; the last three arguments have
    defaults, so callers of the plain loss pass nine."""
    return impl.run(
        "sigmoid_ce_fwd", logits.device, logits, labels, weight, pos_weight, label_smoothing, reduction,
        out_dtype, grad_logits_in_fwd, grad_labels_in_fwd, gamma, alpha, hard_labels,
    )


@sigmoid_ce_fwd.register_fake
def _(logits, labels, weight, pos_weight, label_smoothing, reduction, out_dtype,
      grad_logits_in_fwd, grad_labels_in_fwd, gamma=None, alpha=None, hard_labels=False):
    loss_shape = logits.shape if reduction == R.NONE else ()
    return (
        logits.new_empty(loss_shape, dtype=out_dtype),
        logits.new_empty((), dtype=compute_dtype(logits.dtype)),
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
    label_smoothing: Tensor,
    reduction: int,
    need_grad_logits: bool,
    need_grad_labels: bool,
    gamma: Tensor | None = None,
    alpha: Tensor | None = None,
    hard_labels: bool = False,
) -> tuple[Tensor, Tensor]:
    """(grad_logits, grad_labels) recomputed from the inputs: see `impl.Implementation`."""
    return impl.run(
        "sigmoid_ce_bwd", logits.device, grad, logits, labels, weight, pos_weight, denom, label_smoothing,
        reduction, need_grad_logits, need_grad_labels, gamma, alpha, hard_labels,
    )


@sigmoid_ce_bwd.register_fake
def _(grad, logits, labels, weight, pos_weight, denom, label_smoothing, reduction,
      need_grad_logits, need_grad_labels, gamma=None, alpha=None, hard_labels=False):
    return (
        logits.new_empty(logits.shape if need_grad_logits else (0,)),
        labels.new_empty(labels.shape if need_grad_labels else (0,)),
    )


@torch.library.custom_op("fused_sigxent::sigmoid_ce_scale_", mutates_args=("grad_logits", "grad_labels"))
def sigmoid_ce_scale_(grad: Tensor, grad_logits: Tensor, grad_labels: Tensor) -> None:
    """Multiplies, in place, gradients the forward wrote by the incoming gradient."""
    impl.run("sigmoid_ce_scale_", grad_logits.device, grad, grad_logits, grad_labels)


@sigmoid_ce_scale_.register_fake
def _(grad, grad_logits, grad_labels):
    return None


sigmoid_ce_fwd.register_autograd(derivatives.backward, setup_context=derivatives.setup_context)


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
    """The chunked engine as an op: see `impl.chunked.run_chunks`. Its matmuls
    run in the input's dtype, so autocast (which the front end applied to
    the arguments, as F.linear's) stays out of its body."""
    with torch.autocast(input.device.type, enabled=False):
        return chunked.run_chunks(
            input, weight, bias, scale, target, positives, pos_weight, label_smoothing, reduction, chunk_size,
            need_grad_input, need_grad_weight, need_grad_bias, need_grad_scale, need_grad_pos_weight)


@linear_sigmoid_ce.register_fake
def _(input, weight, bias, scale, target, positives, pos_weight, label_smoothing, reduction, chunk_size,
      need_grad_input, need_grad_weight, need_grad_bias, need_grad_scale, need_grad_pos_weight):
    def grad(needed, t, fallback):
        return t.new_empty(t.shape) if needed else (fallback if t is None else t).new_empty(0)

    return (
        input.new_empty((), dtype=compute_dtype(input.dtype)),
        grad(need_grad_input, input, input),
        grad(need_grad_weight, weight, weight),
        grad(need_grad_bias, bias, input),
        grad(need_grad_scale, scale, input),
        grad(need_grad_pos_weight, pos_weight, input),
    )


linear_sigmoid_ce.register_autograd(derivatives.linear_backward, setup_context=derivatives.linear_setup_context)
