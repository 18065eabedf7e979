"""Every torch.library registration of fused_sigxent, and the route that
serves every loss call (`sigmoid_ce`): front ends reach it through
`_eager.loss`, where a call plan serves plain eager calls seen before."""

import contextlib

import torch
from torch import Tensor

from . import _autograd, _backend, _dispatch, _reference, _traced, _validate
from . import _reduction as R


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
    """(loss, denominator, grad_logits, grad_labels): see `_reference.sigmoid_ce_fwd`.
    gamma (0-d) makes it the focal loss; the last three arguments have
    defaults, so callers of the plain loss pass nine."""
    return _dispatch.run(
        "sigmoid_ce_fwd", logits.device, logits, labels, weight, pos_weight, label_smoothing, reduction,
        out_dtype, grad_logits_in_fwd, grad_labels_in_fwd, gamma, alpha, hard_labels,
    )


@sigmoid_ce_fwd.register_fake
def _(logits, labels, weight, pos_weight, label_smoothing, reduction, out_dtype,
      grad_logits_in_fwd, grad_labels_in_fwd, gamma=None, alpha=None, hard_labels=False):
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
    label_smoothing: Tensor,
    reduction: int,
    need_grad_logits: bool,
    need_grad_labels: bool,
    gamma: Tensor | None = None,
    alpha: Tensor | None = None,
    hard_labels: bool = False,
) -> tuple[Tensor, Tensor]:
    """(grad_logits, grad_labels) recomputed from the inputs: see `_reference.sigmoid_ce_bwd`."""
    return _dispatch.run(
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
    _dispatch.run("sigmoid_ce_scale_", grad_logits.device, grad, grad_logits, grad_labels)


@sigmoid_ce_scale_.register_fake
def _(grad, grad_logits, grad_labels):
    return None


sigmoid_ce_fwd.register_autograd(_autograd.backward, setup_context=_autograd.setup_context)


def sigmoid_ce(
    logits: Tensor,
    labels: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    label_smoothing: float,
    reduction: int,
    out_dtype: torch.dtype,
    gamma: float | None = None,
    alpha: float | None = None,
) -> Tensor:
    """The loss, through the op, for arguments a front end has validated:
    sigmoid cross entropy, or with `gamma` the focal loss (alpha None: no alpha_t).

    The label smoothing (and gamma, alpha) become 0-d tensors here: the op
    takes them as data, so a schedule of values neither specializes kernels
    nor recompiles."""
    _validate.not_scripted()
    smoothing, focal = scalar_arguments(logits, labels, label_smoothing, gamma, alpha)
    dtensor = _validate.is_dtensor(logits, labels, weight, pos_weight)
    if dtensor or _compiled_transform():
        # The reference's plain ops, which autograd, DTensor (shard by shard)
        # and torch.func differentiate and batch themselves.
        with _validate.implicit_replication() if dtensor else contextlib.nullcontext():
            loss, _, _, _ = _reference.sigmoid_ce_fwd(
                logits, labels, weight, pos_weight, smoothing, reduction, out_dtype, False, False, *focal)
        return loss
    if _compiled_on_cpu(logits):
        # Plain ops that Inductor fuses, forward and backward, into its own CPU loops.
        return _traced.loss(logits, labels, weight, pos_weight, smoothing, reduction, out_dtype, *focal)
    grad_logits_in_fwd, grad_labels_in_fwd = _autograd.plan_grads_in_forward(logits, labels, weight, reduction)
    # Both routes run the same op with the same derivatives. Dynamo cannot
    # trace an autograd.Function that defines jvp, so a compiled graph calls
    # the op, which AOTAutograd differentiates through register_autograd;
    # eager code applies the Function, which torch.func and forward AD need.
    if torch.compiler.is_compiling():
        loss, _, _, _ = torch.ops.fused_sigxent.sigmoid_ce_fwd(
            logits, labels, weight, pos_weight, smoothing, reduction, out_dtype,
            grad_logits_in_fwd, grad_labels_in_fwd, *focal)
    else:
        loss, _, _, _ = _autograd.SigmoidCE.apply(
            logits, labels, weight, pos_weight, smoothing, reduction, out_dtype,
            grad_logits_in_fwd, grad_labels_in_fwd, *focal)
    return loss


def scalar_arguments(logits: Tensor, labels: Tensor, label_smoothing: float, gamma: float | None,
                     alpha: float | None) -> tuple[Tensor, tuple]:
    """The op's label_smoothing (a 0-d tensor) and its focal arguments:
    (gamma, alpha, hard_labels), or () for the cross entropy."""
    ct = _reference.compute_dtype(logits.dtype)
    smoothing = _validate.number_as_tensor(label_smoothing, logits, ct)
    if gamma is None:
        return smoothing, ()
    # Unsmoothed bool/uint8/class-index labels are 0 or 1: the kernels'
    # focal factor then needs no log (a host fact, so a constexpr).
    hard = (labels.dtype in (torch.bool, torch.uint8, torch.int64)
            and not isinstance(label_smoothing, torch.SymFloat) and label_smoothing == 0)
    return smoothing, (_validate.number_as_tensor(gamma, logits, ct),
                       None if alpha is None else _validate.number_as_tensor(alpha, logits, ct), hard)


def _compiled_transform() -> bool:
    """A torch.func transform inside a torch.compile'd function. There the op
    is called directly (Dynamo cannot trace `SigmoidCE`), and a custom op
    without a forward-mode formula would give a zero tangent without a word."""
    return torch.compiler.is_compiling() and _functorch_depth() > 0


@torch._dynamo.assume_constant_result
def _functorch_depth() -> int:
    # A fact of the trace (a transform makes a graph of its own). Dynamo
    # calls this while tracing and keeps the number: torch 2.11's Dynamo
    # cannot trace the pybind builtin and broke the graph there.
    return torch._C._functorch.get_dynamic_layer_stack_depth()


def _compiled_on_cpu(logits: Tensor) -> bool:
    """A torch.compile'd graph on CPU tensors (backend `auto`): Inductor fuses
    the reference's plain ops, forward and backward, into vectorized C++
    loops; an opaque op would hide the math from it."""
    return torch.compiler.is_compiling() and logits.device.type == "cpu" and _backend.backend() == "auto"
