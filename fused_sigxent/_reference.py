"""Plain-PyTorch sigmoid cross entropy: the CPU implementation and the test oracle.

Each function here has exactly the signature of the op it implements
(`fused_sigxent/_op.py`), so the kernels can be swapped in one for one.
Math runs in float32 (float64 for float64 logits); results come back in the
logits dtype (the loss), or in the dtype of the tensor differentiated.

Notation (SPEC section 2): x logits, z labels, s label smoothing,
z' = z (1 - s) + s / 2, w weight, p pos_weight, q = 1 + (p - 1) z'.

Everything here is plain differentiable PyTorch, so the same functions also
serve where autograd must see through the gradient itself (double backward,
torch.func transforms, DTensor; see `_autograd.py`). The label smoothing is a
0-d tensor (or a number): it is data, never a branch on the host.
"""

import math

import torch
from torch import Tensor

from . import _reduction as R


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 math for float64 logits, float32 math for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mul0(a: Tensor, b: Tensor) -> Tensor:
    """a * b, with 0 * anything = 0: a zero weight or a zero coefficient masks
    the other factor even where it is inf (the limit, not inf * 0 = NaN)."""
    return torch.where(a == 0, 0.0, a * b)


def smoothed_labels(labels: Tensor, label_smoothing: Tensor | float, dtype: torch.dtype) -> Tensor:
    """z' = z (1 - s) + 0.5 s, in the compute dtype."""
    return labels.to(dtype) * (1.0 - label_smoothing) + 0.5 * label_smoothing


def elementwise_loss(x: Tensor, z: Tensor, p: Tensor | None) -> Tensor:
    """l = (1 - z') x + q softplus(-x), written so that no step overflows:

    l = (1 - z') relu(x) + p z' relu(-x) + q log1p(exp(-|x|))

    With p = 1 this is the seeds' max(x, 0) - x z + log1p(exp(-|x|)).
    The relu terms are masked products, so x = +-inf gives the limit
    (0 where the label agrees, inf where it does not), never NaN.
    """
    log_term = torch.log1p(torch.exp(-x.abs()))
    if p is None:
        return mul0(1 - z, torch.relu(x)) + mul0(z, torch.relu(-x)) + log_term
    q = 1 + (p - 1) * z
    return mul0(1 - z, torch.relu(x)) + mul0(p * z, torch.relu(-x)) + q * log_term


def grad_wrt_logits(x: Tensor, z: Tensor, p: Tensor | None) -> Tensor:
    """dl/dx = (1 - z') sigmoid(x) - p z' sigmoid(-x).

    Equal to sigmoid(x) - z' when p = 1, but with no cancellation when
    sigmoid(x) rounds to 1 or 0.
    """
    pz = z if p is None else p * z
    return (1 - z) * torch.sigmoid(x) - pz * torch.sigmoid(-x)


def grad_wrt_smoothed_labels(x: Tensor, p: Tensor | None) -> Tensor:
    """dl/dz' = -x + (p - 1) softplus(-x) = -relu(x) + p relu(-x) + (p - 1) log1p(exp(-|x|))."""
    if p is None:
        return -x
    return -torch.relu(x) + mul0(p, torch.relu(-x)) + (p - 1) * torch.log1p(torch.exp(-x.abs()))


def grad_wrt_pos_weight(x: Tensor, z: Tensor) -> Tensor:
    """dl/dp = z' softplus(-x) = z' relu(-x) + z' log1p(exp(-|x|))."""
    return mul0(z, torch.relu(-x)) + z * torch.log1p(torch.exp(-x.abs()))


def denominator(
    reduction: int, weight: Tensor | None, logits: Tensor, dtype: torch.dtype, batch_dims: int = 0,
) -> Tensor:
    """What the reduced loss is divided by, as a 0-d tensor of the compute dtype.

    A broadcast weight of n_w elements covers numel / n_w copies of itself,
    so its broadcast sum is weight.sum() * numel / n_w: no full-size temporary.
    With `batch_dims` (vmap), the leading dimensions of logits and weight
    index independent samples, and there is one denominator per sample.
    """
    batch = logits.shape[:batch_dims]
    numel = math.prod(logits.shape[batch_dims:])
    one = torch.ones(batch, dtype=dtype, device=logits.device)
    if reduction in (R.NONE, R.SUM):
        return one
    if weight is None or reduction in (R.MEAN_BY_NUMEL, R.TORCH_MEAN) or numel == 0:
        return one * numel
    per_sample = weight.reshape(*batch, -1) if batch_dims else weight.reshape(-1)
    copies = numel // per_sample.shape[-1]
    if reduction == R.MEAN_BY_WEIGHTS:
        return per_sample.to(dtype).sum(-1) * copies
    return (per_sample != 0).sum(-1).to(dtype) * copies


def divide(numerator: Tensor, denom: Tensor, reduction: int) -> Tensor:
    """numerator / denom as the reduction divides. TF's reductions divide
    "no NaN" (a zero denominator gives 0, and so does its gradient);
    PyTorch's "mean" of an empty tensor is NaN. NONE passes through (its
    incoming gradient is already elementwise)."""
    if reduction == R.NONE:
        return numerator
    if reduction == R.TORCH_MEAN:
        return numerator / denom
    return torch.where(denom == 0, 0.0, numerator / denom)


def _upcast(logits, labels, weight, pos_weight, label_smoothing):
    """(compute dtype, x, z', w, p): the inputs in the compute dtype, labels smoothed."""
    ct = compute_dtype(logits.dtype)
    w = None if weight is None else weight.to(ct)
    p = None if pos_weight is None else pos_weight.to(ct)
    return ct, logits.to(ct), smoothed_labels(labels, label_smoothing, ct), w, p


def _input_grads(x, z, w, p, scale, label_smoothing, logits, labels, need_grad_logits, need_grad_labels):
    """d(loss)/d(logits) and d(loss)/d(labels) for the chain-rule factor
    `scale`, in the dtypes of the tensors differentiated (empty if unasked)."""

    def weighted(d: Tensor) -> Tensor:
        return (d if w is None else mul0(w, d)) * scale

    grad_logits, grad_labels = _unasked(logits), _unasked(labels)
    if need_grad_logits:
        grad_logits = weighted(grad_wrt_logits(x, z, p)).to(logits.dtype).contiguous()
    if need_grad_labels:
        dz = grad_wrt_smoothed_labels(x, p) * (1.0 - label_smoothing)
        grad_labels = weighted(dz).to(labels.dtype).contiguous()
    return grad_logits, grad_labels


def _unasked(t: Tensor) -> Tensor:
    """The placeholder for a gradient nobody asked for (an op cannot return None)."""
    return t.new_empty(0)


def sigmoid_ce_fwd(
    logits: Tensor,
    labels: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    label_smoothing: Tensor | float,
    reduction: int,
    out_dtype: torch.dtype,
    grad_logits_in_fwd: bool,
    grad_labels_in_fwd: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss (reduced, or elementwise for NONE), its denominator, and, when
    asked, the gradients of the loss for an incoming gradient of 1 (which the
    backward then only scales). Unasked gradients come back empty."""
    ct, x, z, w, p = _upcast(logits, labels, weight, pos_weight, label_smoothing)
    loss = elementwise_loss(x, z, p)
    if w is not None:
        loss = mul0(w, loss)
    denom = denominator(reduction, weight, logits, ct)
    if reduction != R.NONE:
        loss = divide(loss.sum(), denom, reduction)
    grad_logits, grad_labels = _unasked(logits), _unasked(labels)
    if grad_logits_in_fwd or grad_labels_in_fwd:
        # The gradient for an incoming 1, from the same upcast inputs.
        one = torch.ones((), dtype=ct, device=logits.device)
        grad_logits, grad_labels = _input_grads(
            x, z, w, p, divide(one, denom, reduction), label_smoothing, logits, labels,
            grad_logits_in_fwd, grad_labels_in_fwd,
        )
    return loss.to(out_dtype).contiguous(), denom, grad_logits, grad_labels


def sigmoid_ce_bwd(
    grad: Tensor,
    logits: Tensor,
    labels: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    denom: Tensor,
    label_smoothing: Tensor | float,
    reduction: int,
    need_grad_logits: bool,
    need_grad_labels: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients for logits and labels, recomputed from the inputs.

    `grad` is the incoming gradient: 0-d for a reduced loss, the logits'
    shape for NONE. Unasked gradients come back empty.
    """
    ct, x, z, w, p = _upcast(logits, labels, weight, pos_weight, label_smoothing)
    return _input_grads(
        x, z, w, p, divide(grad.to(ct), denom, reduction), label_smoothing, logits, labels,
        need_grad_logits, need_grad_labels,
    )


def sigmoid_ce_scale_(grad: Tensor, grad_logits: Tensor, grad_labels: Tensor) -> None:
    """Scales gradients that the forward wrote for an incoming gradient of 1."""
    for g in (grad_logits, grad_labels):
        if g.numel():
            g.copy_(g.to(compute_dtype(g.dtype)) * grad.to(compute_dtype(g.dtype)))


def sigmoid_ce_param_grads(
    grad: Tensor,
    logits: Tensor,
    labels: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    denom: Tensor,
    label_smoothing: Tensor | float,
    reduction: int,
    need_grad_weight: bool,
    need_grad_pos_weight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients for a learned weight and pos_weight, summed back to their
    broadcast shapes. The slow path: full-size temporaries, several launches.

    For MEAN (sum(w l) / sum(w)) the weight also moves the denominator:
    dL/dw = (l - L) / sum(w). The count of nonzero weights is piecewise
    constant, so it contributes nothing.
    """
    ct, x, z, w, p = _upcast(logits, labels, weight, pos_weight, label_smoothing)
    scale = divide(grad.to(ct), denom, reduction)
    grad_weight = grad_pos_weight = None
    if need_grad_weight and w is not None:
        loss = elementwise_loss(x, z, p)
        if reduction == R.MEAN_BY_WEIGHTS:
            loss = loss - divide(mul0(w, loss).sum(), denom, reduction)
        grad_weight = (loss * scale).sum_to_size(weight.shape).to(weight.dtype)
    if need_grad_pos_weight and p is not None:
        d = grad_wrt_pos_weight(x, z)
        if w is not None:
            d = mul0(w, d)
        grad_pos_weight = (d * scale).sum_to_size(pos_weight.shape).to(pos_weight.dtype)
    return grad_weight, grad_pos_weight


def sigmoid_ce_jvp(
    logits: Tensor,
    labels: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    label_smoothing: Tensor | float,
    reduction: int,
    out_dtype: torch.dtype,
    tangents: tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None],
) -> Tensor:
    """Forward-mode derivative of the loss for the tangents of (logits,
    labels, weight, pos_weight), each None where it has none.

    d(w l) = w (dl/dx tx + dl/dz' (1 - s) tz + dl/dp tp) + l tw, summed for a
    reduction; MEAN (sum(w l) / sum(w)) also moves its denominator:
    dL = (dS - L dD) / D with dD the broadcast sum of tw.
    """
    t_logits, t_labels, t_weight, t_pos_weight = tangents
    ct, x, z, w, p = _upcast(logits, labels, weight, pos_weight, label_smoothing)
    d = torch.zeros_like(x)
    if t_logits is not None:
        d = d + grad_wrt_logits(x, z, p) * t_logits.to(ct)
    if t_labels is not None:
        d = d + grad_wrt_smoothed_labels(x, p) * (1.0 - label_smoothing) * t_labels.to(ct)
    if t_pos_weight is not None and p is not None:
        d = d + grad_wrt_pos_weight(x, z) * t_pos_weight.to(ct)
    if w is not None:
        d = mul0(w, d)
        if t_weight is not None:
            d = d + mul0(t_weight.to(ct), elementwise_loss(x, z, p))
    if reduction == R.NONE:
        return d.to(out_dtype)
    denom = denominator(reduction, weight, logits, ct)
    d_total = d.sum()
    if reduction == R.MEAN_BY_WEIGHTS and t_weight is not None and w is not None:
        loss = elementwise_loss(x, z, p)
        value = divide(mul0(w, loss).sum(), denom, reduction)
        d_total = d_total - value * denominator(reduction, t_weight, logits, ct)
    return divide(d_total, denom, reduction).to(out_dtype)
