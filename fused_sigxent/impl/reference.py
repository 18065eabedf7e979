"""Plain-PyTorch sigmoid cross entropy: the CPU implementation and the test oracle.

Each op function here has the signature `impl.Implementation` gives it, so
the kernels can be swapped in one for one.
Math runs in float32 (float64 for float64 logits); results come back in the
logits dtype (the loss), or in the dtype of the tensor differentiated.

Notation (docs/semantics.md): x logits, z labels, s label smoothing,
z' = z (1 - s) + s / 2, w weight, p pos_weight, q = 1 + (p - 1) z'.

Everything here is plain differentiable PyTorch, so the same functions also
serve where autograd must see through the gradient itself (double backward,
torch.func transforms, DTensor; see `op/derivatives.py`). The label smoothing is a
0-d tensor (or a number): it is data, never a branch on the host.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import reduction as R
from ..core.dtypes import compute_dtype


def mul0(a: Tensor, b: Tensor) -> Tensor:
    """a * b, with 0 * anything = 0: a zero weight or a zero coefficient masks
    the other factor even where it is inf (the limit, not inf * 0 = NaN).

    Where autograd records (create_graph, torch.func, DTensor), its
    derivatives are a * b's: at a = 0, b for a (0 where b is not finite) and
    0 for b; where(a == 0, 0, a * b) would give 0 for a, so a labels gradient
    of 0 at hard labels and a weight gradient of 0 at a zero weight. That
    form costs a compiled graph half its speed, and the same values, so it
    serves where nothing is recorded (an op's or a Function's forward)."""
    if torch.is_grad_enabled():
        return a * torch.where(a == 0, torch.where(b.isfinite(), b, 0.0), b)
    return torch.where(a == 0, 0.0, a * b)


def smoothed_labels(labels: Tensor, label_smoothing: Tensor | float, dtype: torch.dtype) -> Tensor:
    """z' = z (1 - s) + 0.5 s, in the compute dtype."""
    return labels.to(dtype) * (1.0 - label_smoothing) + 0.5 * label_smoothing


def split_at_zero(x: Tensor) -> tuple[Tensor, Tensor]:
    """(x >= 0, |x|), |x| a where on the first; the formulas here write
    relu(x) and relu(-x) as where(pos, x, 0) and where(pos, 0, -x) alike.

    Autograd (double backward, torch.func, DTensor, a compiled graph)
    differentiates these formulas, and at x = 0 it differentiates each piece
    by its x >= 0 branch (1 for |x| and relu(x), 0 for relu(-x)). On that
    branch every formula here is the function itself, so its derivatives at
    0 come out exact, to every order. torch.relu's and abs()'s derivatives
    at 0 are 0: the loss's would be 0 there instead of 1/2 - z', which a
    zero-initialized head gives every element of its first step."""
    pos = x >= 0
    return pos, torch.where(pos, x, -x)


def elementwise_loss(x: Tensor, z: Tensor, p: Tensor | None) -> Tensor:
    """l = (1 - z') x + q softplus(-x), written so that no step overflows:

    l = (1 - z') relu(x) + p z' relu(-x) + q log1p(exp(-|x|))

    With p = 1 this is TensorFlow's max(x, 0) - x z + log1p(exp(-|x|)).
    The relu terms are masked products, so x = +-inf gives the limit
    (0 where the label agrees, inf where it does not), never NaN.
    """
    pos, ax = split_at_zero(x)
    relu, relu_neg = torch.where(pos, x, 0.0), torch.where(pos, 0.0, -x)
    log_term = torch.log1p(torch.exp(-ax))
    if p is None:
        return mul0(1 - z, relu) + mul0(z, relu_neg) + log_term
    q = 1 + (p - 1) * z
    return mul0(1 - z, relu) + mul0(p * z, relu_neg) + q * log_term


def sigmoids(x: Tensor) -> tuple[Tensor, Tensor]:
    """(sigmoid(x), sigmoid(-x)) from one exp, as the kernels form them:
    with e = exp(-|x|) and r = 1 / (1 + e), (r, e r) for x >= 0 and (e r, r)
    below. Two torch.sigmoid calls would cost a compiled graph two exps and
    two divisions per element."""
    pos, ax = split_at_zero(x)
    e = torch.exp(-ax)
    r = torch.reciprocal(1 + e)
    er = e * r
    return torch.where(pos, r, er), torch.where(pos, er, r)


def grad_wrt_logits(x: Tensor, z: Tensor, p: Tensor | None) -> Tensor:
    """dl/dx = (1 - z') sigmoid(x) - p z' sigmoid(-x).

    Equal to sigmoid(x) - z' when p = 1, but with no cancellation when
    sigmoid(x) rounds to 1 or 0.
    """
    pz = z if p is None else p * z
    sig, sig_neg = sigmoids(x)
    return (1 - z) * sig - pz * sig_neg


def grad_wrt_smoothed_labels(x: Tensor, p: Tensor | None) -> Tensor:
    """dl/dz' = -x + (p - 1) softplus(-x) = -relu(x) + p relu(-x) + (p - 1) log1p(exp(-|x|))."""
    if p is None:
        return -x
    pos, ax = split_at_zero(x)
    return -torch.where(pos, x, 0.0) + mul0(p, torch.where(pos, 0.0, -x)) + (p - 1) * torch.log1p(torch.exp(-ax))


def grad_wrt_pos_weight(x: Tensor, z: Tensor) -> Tensor:
    """dl/dp = z' softplus(-x) = z' relu(-x) + z' log1p(exp(-|x|))."""
    pos, ax = split_at_zero(x)
    return mul0(z, torch.where(pos, 0.0, -x)) + z * torch.log1p(torch.exp(-ax))


def class_index_labels(index: Tensor, n_classes: int, dtype: torch.dtype) -> Tensor:
    """Labels of int64 class indices (shape logits.shape[:-1], values in
    [-1, C]; -1 = padding and C = background: no positive) as one-hot rows
    over the last dimension, NaN over a row whose index is outside [-1, C]
    (no host sync to raise; the loss shows it). A full-size comparison: the reference is
    the definition and clarity wins; the kernels compare each column with
    its row's index instead and never form it."""
    hot = (torch.arange(n_classes, device=index.device) == index[..., None]).to(dtype)
    bad = (index < -1) | (index > n_classes)
    return torch.where(bad[..., None], math.nan, hot)


def focal_factor(x: Tensor, z: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(F, dF/dx, dF/dz') for F = (1 - p_t)^gamma, 1 - p_t = sigmoid(x) (1 - z') + sigmoid(-x) z'.

    In log space, so no step underflows or divides 0 by 0: with e = exp(-|x|)
    and y = z' (x >= 0) or 1 - z' (x < 0),
      1 - p_t = sigmoid(|x|) a,  a = (1 - y) + y e,
      log(1 - p_t) = logsigmoid(|x|) + log a,  log a = -|x| where y = 1 (a = e,
      exactly, even where e underflows),
      dF/dx = gamma F d log(1 - p_t)/dx = gamma F sigmoid(|x|) (1 - 2 z') e / a,
      dF/dz' = gamma F (-+)(1 - e) / a = -+gamma (1 - e) exp(gamma logsigmoid(|x|) + (gamma - 1) log a).
    So gamma < 1 at a confident logit gives a finite gradient (pow's
    derivative gamma (1 - p_t)^(gamma - 1) is inf there, times 0: NaN in
    torchvision). gamma = 0 gives F = 1 and dF = 0 exactly (0 * log 0 = 0).
    """
    pos, ax = split_at_zero(x)
    e = torch.exp(-ax)
    # a from z' itself, never from a rounded y: a label a hair below 0 (or
    # above 1) makes a, and 1 - p_t, negative (log: NaN), as it is; the
    # kernels form a the same way. y = 1 exactly where z' is 1 (x >= 0) or 0.
    a = torch.where(pos, (1 - z) + z * e, z + (1 - z) * e)
    agree = torch.where(pos, z == 1, z == 0)
    # The unselected branch sees a = 1 instead of 0: no inf whose gradient
    # (under create_graph) would be 0 * inf.
    safe_a = torch.where(agree, 1.0, a)
    log_a = torch.where(agree, -ax, torch.log(safe_a))
    log_r = F.logsigmoid(ax)
    factor = torch.exp(mul0(gamma, log_r + log_a))
    e_over_a = torch.where(agree, 1.0, e / safe_a)
    d_x = gamma * factor * torch.sigmoid(ax) * (1 - 2 * z) * e_over_a
    sign = torch.where(pos, -1.0, 1.0)
    # mul0: gamma = 0 gives 0 even where log a is NaN (labels outside [0, 1]).
    d_z = mul0(gamma, sign * (1 - e) * torch.exp(mul0(gamma, log_r) + mul0(gamma - 1, log_a)))
    return factor, d_x, d_z


def alpha_factor(z: Tensor, alpha: Tensor | None) -> tuple[Tensor | float, Tensor | float]:
    """(alpha_t, d alpha_t/dz') with alpha_t = alpha z' + (1 - alpha)(1 - z'); (1, 0) without alpha."""
    if alpha is None:
        return 1.0, 0.0
    return (1 - alpha) + (2 * alpha - 1) * z, 2 * alpha - 1


def _mul0(a, b):
    return b if isinstance(a, float) and a == 1.0 else mul0(a, b)


def pointwise(x: Tensor, z: Tensor, p: Tensor | None, focal=None, need: str = "l") -> dict:
    """The elementwise loss and its derivatives, as `need` lists them ("l"
    loss, "x" dl/dx, "z" dl/dz', "p" dl/dp): sigmoid cross entropy, or with
    focal = (gamma, alpha) (0-d tensors, alpha None for no alpha_t) the
    focal loss alpha_t (1 - p_t)^gamma l (docs/semantics.md)."""
    out = {}
    if focal is None:
        if "l" in need:
            out["l"] = elementwise_loss(x, z, p)
        if "x" in need:
            out["x"] = grad_wrt_logits(x, z, p)
        if "z" in need:
            out["z"] = grad_wrt_smoothed_labels(x, p)
        if "p" in need:
            out["p"] = grad_wrt_pos_weight(x, z)
        return out
    gamma, alpha = focal
    ce = elementwise_loss(x, z, p)
    factor, d_x, d_z = focal_factor(x, z, gamma)
    a_t, d_a = alpha_factor(z, alpha)
    if "l" in need:
        out["l"] = _mul0(a_t, mul0(factor, ce))
    if "x" in need:
        out["x"] = _mul0(a_t, factor * grad_wrt_logits(x, z, p) + mul0(d_x, ce))
    if "z" in need:
        dz = _mul0(a_t, mul0(factor, grad_wrt_smoothed_labels(x, p)) + mul0(d_z, ce))
        out["z"] = dz if alpha is None else dz + d_a * mul0(factor, ce)
    if "p" in need:
        out["p"] = _mul0(a_t, factor * grad_wrt_pos_weight(x, z))
    return out


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
    # The division's own denominator is never 0: the branch `where` drops
    # would still carry 0 * (1 / 0) = NaN into an autograd gradient.
    zero = denom == 0
    return torch.where(zero, 0.0, numerator / torch.where(zero, 1.0, denom))


def _upcast(logits, labels, weight, pos_weight, label_smoothing):
    """(compute dtype, x, z', w, p): the inputs in the compute dtype, labels
    smoothed (int64 class indices read as one-hot rows first)."""
    ct = compute_dtype(logits.dtype)
    w = None if weight is None else weight.to(ct)
    p = None if pos_weight is None else pos_weight.to(ct)
    if labels.dtype == torch.int64:
        labels = class_index_labels(labels, logits.shape[-1], ct)
    return ct, logits.to(ct), smoothed_labels(labels, label_smoothing, ct), w, p


def _focal(gamma: Tensor | None, alpha: Tensor | None, ct: torch.dtype):
    """(gamma, alpha) in the compute dtype for `pointwise`, or None for sigmoid cross entropy."""
    if gamma is None:
        return None
    return gamma.to(ct), None if alpha is None else alpha.to(ct)


def _input_grads(x, z, w, p, scale, label_smoothing, logits, labels, need_grad_logits, need_grad_labels,
                 focal=None):
    """d(loss)/d(logits) and d(loss)/d(labels) for the chain-rule factor
    `scale`, in the dtypes of the tensors differentiated (empty if unasked)."""

    def weighted(d: Tensor) -> Tensor:
        return (d if w is None else mul0(w, d)) * scale

    grad_logits, grad_labels = _unasked(logits), _unasked(labels)
    need = "x" * need_grad_logits + "z" * need_grad_labels
    d = pointwise(x, z, p, focal, need) if need else {}
    if need_grad_logits:
        grad_logits = weighted(d["x"]).to(logits.dtype).contiguous()
    if need_grad_labels:
        grad_labels = weighted(d["z"] * (1.0 - label_smoothing)).to(labels.dtype).contiguous()
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
    gamma: Tensor | None = None,
    alpha: Tensor | None = None,
    hard_labels: bool = False,
    *,
    grad_logits_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`impl.Implementation.sigmoid_ce_fwd`, the definition. hard_labels
    (the kernels' cheaper focal factor) is unused here; int64 labels are
    read by `class_index_labels`."""
    ct, x, z, w, p = _upcast(logits, labels, weight, pos_weight, label_smoothing)
    focal = _focal(gamma, alpha, ct)
    loss = pointwise(x, z, p, focal)["l"]
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
            grad_logits_in_fwd, grad_labels_in_fwd, focal,
        )
        if grad_logits_out is not None:
            grad_logits = grad_logits_out.copy_(grad_logits)
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
    gamma: Tensor | None = None,
    alpha: Tensor | None = None,
    hard_labels: bool = False,
) -> tuple[Tensor, Tensor]:
    """Gradients for logits and labels, recomputed from the inputs.

    `grad` is the incoming gradient: 0-d for a reduced loss, the logits'
    shape for NONE. Unasked gradients come back empty. gamma, alpha,
    hard_labels: as in `sigmoid_ce_fwd`.
    """
    ct, x, z, w, p = _upcast(logits, labels, weight, pos_weight, label_smoothing)
    return _input_grads(
        x, z, w, p, divide(grad.to(ct), denom, reduction), label_smoothing, logits, labels,
        need_grad_logits, need_grad_labels, _focal(gamma, alpha, ct),
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
    gamma: Tensor | None = None,
    alpha: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients for a learned weight and pos_weight, summed back to their
    broadcast shapes. The slow path: full-size temporaries, several launches.

    For MEAN (sum(w l) / sum(w)) the weight also moves the denominator:
    dL/dw = (l - L) / sum(w). The count of nonzero weights is piecewise
    constant, so it contributes nothing.
    """
    ct, x, z, w, p = _upcast(logits, labels, weight, pos_weight, label_smoothing)
    focal = _focal(gamma, alpha, ct)
    scale = divide(grad.to(ct), denom, reduction)
    grad_weight = grad_pos_weight = None
    if need_grad_weight and w is not None:
        loss = pointwise(x, z, p, focal)["l"]
        if reduction == R.MEAN_BY_WEIGHTS:
            loss = loss - divide(mul0(w, loss).sum(), denom, reduction)
        grad_weight = (loss * scale).sum_to_size(weight.shape).to(weight.dtype)
    if need_grad_pos_weight and p is not None:
        d = pointwise(x, z, p, focal, "p")["p"]
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
    gamma: Tensor | None = None,
    alpha: Tensor | None = None,
) -> Tensor:
    """Forward-mode derivative of the loss for the tangents of (logits,
    labels, weight, pos_weight), each None where it has none.

    d(w l) = w (dl/dx tx + dl/dz' (1 - s) tz + dl/dp tp) + l tw, summed for a
    reduction; MEAN (sum(w l) / sum(w)) also moves its denominator:
    dL = (dS - L dD) / D with dD the broadcast sum of tw.
    """
    t_logits, t_labels, t_weight, t_pos_weight = tangents
    ct, x, z, w, p = _upcast(logits, labels, weight, pos_weight, label_smoothing)
    focal = _focal(gamma, alpha, ct)
    terms = pointwise(x, z, p, focal, "lxzp" if p is not None else "lxz")
    d = torch.zeros_like(x)
    if t_logits is not None:
        d = d + terms["x"] * t_logits.to(ct)
    if t_labels is not None:
        d = d + terms["z"] * (1.0 - label_smoothing) * t_labels.to(ct)
    if t_pos_weight is not None and p is not None:
        d = d + terms["p"] * t_pos_weight.to(ct)
    if w is not None:
        d = mul0(w, d)
        if t_weight is not None:
            d = d + mul0(t_weight.to(ct), terms["l"])
    if reduction == R.NONE:
        return d.to(out_dtype)
    denom = denominator(reduction, weight, logits, ct)
    d_total = d.sum()
    if reduction == R.MEAN_BY_WEIGHTS and t_weight is not None and w is not None:
        value = divide(mul0(w, terms["l"]).sum(), denom, reduction)
        d_total = d_total - value * denominator(reduction, t_weight, logits, ct)
    return divide(d_total, denom, reduction).to(out_dtype)
