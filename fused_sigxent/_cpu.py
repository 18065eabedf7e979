"""The op on CPU tensors: the stable formulas, evaluated piece by piece.

PyTorch eager evaluates a loss as a chain of full-size temporaries, each a
trip through main memory. Here the formulas of `_reference.py` run on pieces
of `PIECE` elements, whose temporaries stay in the cache, and write into
outputs allocated once: the loss (or its running sum) and, when asked, the
gradient that autograd is handed. So the peak memory of a step is its
outputs plus a few pieces, and the inputs are read once. The formulas are
the reference's, regrouped into PyTorch's fused primitives (fewer passes per
piece); tests hold them to the reference and to float64 math.
Each op function has the signature of the op it implements (`_op.py`).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _reference
from . import _reduction as R

# Elements per piece: a few float32 temporaries of 128k elements (512 KiB
# each) stay in the cache. Timed on this 2-core machine (1M float32, forward,
# one thread): 8k 10.6 ms, 32k 6.7, 128k 5.4, 1M (one piece) 17.0; smaller
# pieces pay Python's and the dispatcher's per-op cost, larger ones leave
# the cache.
PIECE = 1 << 17


def _pieces(shape: torch.Size, coefficients: list[Tensor | None]):
    """Index tuples that cut a tensor of `shape` (and coefficients expanded to
    it, as views) into pieces of about PIECE elements. Flat where every
    coefficient is absent or a single number; else along the first dimension,
    so a broadcast coefficient is sliced as a strided view, never copied."""
    numel = math.prod(shape)
    if len(shape) == 0 or numel == 0:
        return [()]
    if all(c is None or c.numel() == 1 for c in coefficients):
        return [(slice(start, start + PIECE),) for start in range(0, numel, PIECE)]
    rows = max(1, PIECE // max(1, numel // shape[0]))
    return [(slice(start, start + rows),) for start in range(0, shape[0], rows)]


def _views(logits, labels, weight, pos_weight):
    """The inputs as the pieces index them: flat or shaped, coefficients expanded (views)."""
    flat = all(c is None or c.numel() == 1 for c in (weight, pos_weight))
    x, z = logits.contiguous(), labels.contiguous()
    if flat:
        x, z = x.reshape(-1), z.reshape(-1)
    coefficients = []
    for c in (weight, pos_weight):
        if c is not None:
            c = c.reshape(()) if flat else c.expand(logits.shape)
        coefficients.append(c)
    return x, z, *coefficients


def _fast_loss(x: Tensor, z: Tensor, p: Tensor | None, w: Tensor | None) -> Tensor:
    """w ((1 - z') relu(x) + p z' relu(-x) + q log1p(exp(-|x|))), q = 1 + (p - 1) z',
    without the reference's masked products: exact for finite inputs, NaN
    where a product is 0 * inf (an infinite logit whose label agrees) or an
    input is NaN; `_piece_results` then sends the piece to the reference."""
    loss = (1 - z).mul_(x.clamp_min(0))
    pz = z if p is None else p * z
    loss.addcmul_(pz, x.clamp_max(0), value=-1)
    log_term = F.logsigmoid(x.abs())  # -log1p(exp(-|x|))
    if p is None:
        loss.sub_(log_term)
    else:
        loss.addcmul_(1 - z + pz, log_term, value=-1)
    return loss if w is None else loss.mul_(w)


def _fast_grads(x, z, w, p, scale, one_minus_s, need_logits: bool, need_labels: bool):
    """scale w dl/dx and scale w (1 - s) dl/dz' (`_reference._input_grads`):
    dl/dx = q sigmoid(x) - p z' (sigmoid(x) - z' without pos_weight, as
    PyTorch writes it); dl/dz' = -relu(x) + p relu(-x) + (p - 1) log1p(exp(-|x|))."""
    factor = scale if w is None else w * scale
    grad_logits = grad_labels = None
    if need_logits:
        sig = torch.sigmoid(x)
        grad_logits = (sig.sub_(z) if p is None else sig.mul_(1 - z + p * z).sub_(p * z)).mul_(factor)
    if need_labels:
        if p is None:
            d = x.neg()
        else:
            d = (p * x.clamp_max(0)).neg_().sub_(x.clamp_min(0))
            d.addcmul_(p - 1, F.logsigmoid(x.abs()), value=-1)
        grad_labels = d.mul_(factor).mul_(one_minus_s)
    return grad_logits, grad_labels


def _piece(x_all, z_all, w_all, p_all, piece, smoothing, ct):
    """The inputs of one piece, upcast to the compute dtype, labels smoothed."""
    x = x_all[piece].to(ct)
    z = torch.addcmul(0.5 * smoothing, z_all[piece].to(ct), 1 - smoothing)  # z' = z (1 - s) + s / 2
    # A single-number coefficient is 0-d: it broadcasts over every piece.
    w = None if w_all is None else (w_all if w_all.dim() == 0 else w_all[piece]).to(ct)
    p = None if p_all is None else (p_all if p_all.dim() == 0 else p_all[piece]).to(ct)
    return x, z, w, p


def _piece_results(x, z, w, p, smoothing, scale, need_logits, need_labels, x_raw, z_raw):
    """(loss, its sum, grad_logits, grad_labels) of one piece: the fast formulas, or,
    where they meet an infinite logit or a NaN (rare; the loss shows it as
    NaN), the reference's masked ones, so the limits and masking are its."""
    loss = _fast_loss(x, z, p, w)
    total = loss.sum()
    if not total.isnan():  # a NaN anywhere makes the sum NaN
        return (loss, total, *_fast_grads(x, z, w, p, scale, 1 - smoothing, need_logits, need_labels))
    loss = _reference.elementwise_loss(x, z, p)
    loss = loss if w is None else _reference.mul0(w, loss)
    grad_logits, grad_labels = _reference._input_grads(
        x, z, w, p, scale, smoothing, x_raw, z_raw, need_logits, need_labels)
    return loss, loss.sum(), grad_logits if need_logits else None, grad_labels if need_labels else None


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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same contract as `_reference.sigmoid_ce_fwd`."""
    ct = _reference.compute_dtype(logits.dtype)
    smoothing = torch.as_tensor(label_smoothing, dtype=ct)
    x_all, z_all, w_all, p_all = _views(logits, labels, weight, pos_weight)
    denom = _reference.denominator(reduction, weight, logits, ct)
    loss = torch.empty(logits.shape if reduction == R.NONE else (), dtype=out_dtype)
    grad_logits = torch.empty(logits.shape if grad_logits_in_fwd else (0,), dtype=logits.dtype)
    grad_labels = torch.empty(labels.shape if grad_labels_in_fwd else (0,), dtype=labels.dtype)
    loss_all = loss.view(x_all.shape) if reduction == R.NONE else None
    gx_all = grad_logits.view(x_all.shape) if grad_logits_in_fwd else None
    gz_all = grad_labels.view(x_all.shape) if grad_labels_in_fwd else None
    scale = _reference.divide(torch.ones((), dtype=ct), denom, reduction)
    partial_sums = []
    for piece in _pieces(x_all.shape, [weight, pos_weight]):
        x, z, w, p = _piece(x_all, z_all, w_all, p_all, piece, smoothing, ct)
        piece_loss, piece_sum, gx, gz = _piece_results(
            x, z, w, p, smoothing, scale, grad_logits_in_fwd, grad_labels_in_fwd, x_all[piece], z_all[piece])
        if reduction == R.NONE:
            loss_all[piece] = piece_loss
        else:
            partial_sums.append(piece_sum)
        if gx is not None:
            gx_all[piece] = gx
        if gz is not None:
            gz_all[piece] = gz
    if reduction != R.NONE:
        total = torch.stack(partial_sums).sum() if partial_sums else torch.zeros((), dtype=ct)
        loss.copy_(_reference.divide(total, denom, reduction))
    return loss, denom, grad_logits, grad_labels


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
) -> tuple[Tensor, Tensor]:
    """Same contract as `_reference.sigmoid_ce_bwd`."""
    ct = _reference.compute_dtype(logits.dtype)
    smoothing = torch.as_tensor(label_smoothing, dtype=ct)
    x_all, z_all, w_all, p_all = _views(logits, labels, weight, pos_weight)
    grad_logits = torch.empty(logits.shape if need_grad_logits else (0,), dtype=logits.dtype)
    grad_labels = torch.empty(labels.shape if need_grad_labels else (0,), dtype=labels.dtype)
    if not (need_grad_logits or need_grad_labels):
        return grad_logits, grad_labels
    gx_all = grad_logits.view(x_all.shape) if need_grad_logits else None
    gz_all = grad_labels.view(x_all.shape) if need_grad_labels else None
    # NONE's incoming gradient is elementwise (an expanded one is copied once).
    g_all = grad.expand(logits.shape).reshape(x_all.shape) if reduction == R.NONE else None
    scale = None if reduction == R.NONE else _reference.divide(grad.to(ct), denom, reduction)
    for piece in _pieces(x_all.shape, [weight, pos_weight]):
        x, z, w, p = _piece(x_all, z_all, w_all, p_all, piece, smoothing, ct)
        piece_scale = scale if g_all is None else g_all[piece].to(ct)
        _, _, gx, gz = _piece_results(
            x, z, w, p, smoothing, piece_scale, need_grad_logits, need_grad_labels, x_all[piece], z_all[piece])
        if gx is not None:
            gx_all[piece] = gx
        if gz is not None:
            gz_all[piece] = gz
    return grad_logits, grad_labels


def sigmoid_ce_scale_(grad: Tensor, grad_logits: Tensor, grad_labels: Tensor) -> None:
    """Same contract as `_reference.sigmoid_ce_scale_`, in place with no
    full-size temporary (the product is formed in float32 and rounded once)."""
    for g in (grad_logits, grad_labels):
        if g.numel():
            g.mul_(grad.to(_reference.compute_dtype(g.dtype)))


def traced_loss(logits, labels, weight, pos_weight, label_smoothing, reduction, out_dtype) -> Tensor:
    """The loss as plain differentiable ops, for a torch.compile'd graph on
    CPU tensors: Inductor traces and fuses them (forward and backward) into
    its own loops, where an opaque op would hide the math from it."""
    loss, _, _, _ = _reference.sigmoid_ce_fwd(
        logits, labels, weight, pos_weight, label_smoothing, reduction, out_dtype, False, False)
    return loss
