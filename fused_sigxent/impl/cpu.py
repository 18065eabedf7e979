"""The op on CPU tensors: the compiled one-pass loop (`cpu_loop`) for the
cross entropy where it is built; else, and for the focal loss and class-index
labels, the stable formulas as ATen ops in cache-sized tiles, with few passes.

PyTorch eager evaluates a loss as a chain of full-size temporaries, each a
trip through main memory. Here the loss and its gradient run on tiles of
about `TILE` elements whose temporaries are a few scratch buffers of a
tile's size, reused tile after tile (they stay in the cache), and are
written into outputs allocated once: the loss (or only its sum) and, when
asked, the gradient that autograd is handed. So a call's peak memory is its
outputs plus a few tiles, and its inputs are read from memory once.

The formulas (`_fast_tile`) are PyTorch's own rewrite of the loss, with one
transcendental pass for the loss and one for the gradient, every other step
a fused in-place primitive. They are exact for finite inputs; where they
are not (an infinite logit, a NaN, a zero weight masking either) they give
NaN, which the tile's sum shows, and that tile is redone by the masked
formulas of `impl/reference.py`, which define those limits. Tests hold both to
the reference and to float64 math (tests/impl/test_cpu.py).

Each op function has the signature `impl.Implementation` gives it.
Reduced sums accumulate per tile in float64 on the host (one read per
tile), so the result does not depend on how the tiles fall.
"""

import math

import torch
from torch import Tensor

from ..core import reduction as R
from ..core.dtypes import compute_dtype
from . import cpu_loop, reference

# Elements per tile: a few float32 temporaries of 256K elements (1 MiB each)
# stay in a server's L2/L3, and each of two ATen threads gets 128K elements
# per op. Smaller tiles pay more per-op joins of the threads, larger ones
# fall out of the caches and hold more memory (a 1M-element tensor's
# temporaries must stay below PyTorch eager's). The sweep that chose it:
# docs/performance.md.
TILE = 1 << 18

# 0-d ones of each compute dtype: the `1 +` of q = 1 + (p - 1) z' (a tensor
# operand keeps float64 math in float64).
_ONE = {dt: torch.ones((), dtype=dt) for dt in (torch.float32, torch.float64)}


class _Scratch:
    """Named buffers of the first (largest) tile's shape, allocated on first
    use and reused by every tile of a call: the temporaries stay in the
    cache, and a call holds these few buffers however many tiles it has."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.buffers = dtype, {}

    def __call__(self, name: str, like: Tensor) -> Tensor:
        """Buffer `name` for tile `like` (the last tile may have fewer rows)."""
        buffer = self.buffers.get(name)
        if buffer is None:
            buffer = self.buffers[name] = torch.empty(like.shape, dtype=self.dtype)
        if like.dim() and buffer.shape[0] != like.shape[0]:
            return buffer[: like.shape[0]]
        return buffer


def _scaled_into(t: Tensor, factor: Tensor | float, out: Tensor) -> None:
    """out = t * factor, in place where `out` is `t`, rounded once to out's dtype."""
    if isinstance(factor, float) and factor == 1.0:
        if out is not t:
            out.copy_(t)
    elif out is t:
        t.mul_(factor)
    else:
        torch.mul(t, factor, out=out)


def _loss_buffer(loss_out: Tensor | None, x: Tensor, scratch_buffer: Tensor) -> Tensor:
    """Where a tile's loss is computed: `loss_out` itself when it has the
    compute dtype, else a scratch buffer (copied out by `_weighted_sum`)."""
    return loss_out if loss_out is not None and loss_out.dtype == x.dtype else scratch_buffer


def _weighted_sum(loss: Tensor, w: Tensor | None, loss_out: Tensor | None) -> float:
    """Weights a tile's loss (in place), copies it into `loss_out` if asked
    and not already there, and returns its sum: the tile's one host read."""
    if w is not None:
        loss.mul_(w)
    total = loss.sum().item()
    if loss_out is not None and loss_out is not loss:
        loss_out.copy_(loss)
    return total


def _fast_tile(x, z, w, p, pm1, gw, label_factor, scratch, want_loss, loss_out, gx_out, gz_out) -> float:
    """One tile by the fast formulas, into the outputs given (None: not
    asked): the weighted loss (if `want_loss`) into `loss_out` (None: only
    its sum), gw dl/dx into `gx_out`, label_factor gw dl/dz' into `gz_out`.
    x, z' and the tiles of w, p and p - 1 are in the compute dtype; gw is w
    times the incoming gradient (a tensor, or a number). Returns a sum: of
    the loss if asked, else of the gradients. NaN there marks a tile these
    formulas got wrong.

    With ls = logsigmoid(x) = min(x, 0) - log1p(exp(-|x|)), q = 1 + (p - 1) z':
      l      = (1 - z') x - q ls      (PyTorch's form)
      dl/dx  = q sigmoid(x) - p z'    (sigmoid(x) - z' without pos_weight)
      dl/dz' = -x - (p - 1) ls
    Each statement is one pass over the tile, in place where it can be.
    """
    total = ls = q = None
    if want_loss or (gz_out is not None and p is not None):
        ls = torch._C._nn.log_sigmoid(x, out=scratch("ls", x))
    if gz_out is not None:
        if p is None:
            d = torch.mul(x, -label_factor, out=scratch("dz", x))
        else:
            d = torch.addcmul(x, pm1, ls, out=scratch("dz", x)).mul_(-label_factor)
        _scaled_into(d, gw, gz_out)
        if not want_loss:
            total = gz_out.sum().item()
    if p is not None and (want_loss or gx_out is not None):
        q = torch.addcmul(_ONE[x.dtype], pm1, z, out=scratch("q", x))
    if want_loss:
        q_ls = ls if q is None else ls.mul_(q)
        loss = _loss_buffer(loss_out, x, q_ls)
        torch.sub(x, q_ls, out=loss).addcmul_(z, x, value=-1)
        total = _weighted_sum(loss, w, loss_out)
    if gx_out is not None:
        if total is not None and total != total:
            # The reference redoes this tile: leave gx_out alone, since it
            # may be the logits themselves (`grad_logits_out`).
            return total
        # The loss is summed by now, so its buffer can hold the gradient.
        g = gx_out if gx_out.dtype == x.dtype else scratch("ls", x)
        torch.sigmoid(x, out=g)
        if q is None:
            g.sub_(z)
        else:
            g.mul_(q).addcmul_(p, z, value=-1)
        _scaled_into(g, gw, gx_out)
        if not want_loss:
            total = gx_out.sum().item() + (0.0 if total is None else total)
    return total


def _focal_tile(x, z, w, gamma: float, alpha: float | None, gw, scratch, want_loss, loss_out, gx_out) -> float:
    """`_fast_tile` for the focal loss alpha_t (1 - p_t)^gamma l (no
    pos_weight, no labels gradient: those take the reference). With
    s = sigmoid(x) and s' = sigmoid(-x), each exact where the other rounds
    to 1:
      A = (1 - z') s,  B = z' s',  1 - p_t = A + B,  F = (A + B)^gamma,
      l = relu(x) - z' x + log1p(exp(-|x|)),  dl/dx = A - B,
      dF/dx = gamma F s s' (1 - 2 z') / (A + B),
    the last never pow's gamma (A + B)^(gamma - 1), which is inf at a
    confident logit for gamma < 1 (torchvision's NaN). Where A + B is 0
    (|x| beyond ~100) the ratio is 0/0: NaN, and the tile is redone by the
    reference, as for an infinite logit. alpha_t = (1 - alpha) + (2 alpha - 1) z'
    multiplies F once, for the loss and the gradient. s' comes from
    logsigmoid's own exp(-|x|) (its backward's formula, no exp of its own)
    rather than a second sigmoid pass."""
    # Seven tile-sized buffers, each reused once its value is
    # spent (fresh memory costs a page fault per 4 KiB on every call).
    # logsigmoid(|x|) = -log1p(e) and its e = exp(-|x|), each without
    # cancellation; then l = relu(x) - z' x + log1p(e), exact where a hard
    # label agrees with a confident logit (PyTorch's (1 - z') x - logsigmoid(x)
    # rounds that loss to 0, and the gradient's ratio below with it).
    ce, minus_log1p_e, e = scratch("l", x), scratch("-log1p(e)", x), scratch("e", x)
    torch.ops.aten.log_sigmoid_forward.output(torch.abs(x, out=ce), output=minus_log1p_e, buffer=e)
    s_neg = torch.ops.aten.log_sigmoid_backward.grad_input(
        _ONE[x.dtype].expand(x.shape), x, e, grad_input=scratch("s'", x))
    torch.clamp_min(x, 0, out=ce).addcmul_(z, x, value=-1).sub_(minus_log1p_e)
    s = torch.sigmoid(x, out=scratch("s", x))
    a = gx_out if gx_out is not None and gx_out.dtype == x.dtype else scratch("A", x)
    torch.addcmul(s, z, s, value=-1, out=a)
    b = torch.mul(z, s_neg, out=e)
    q = torch.add(a, b, out=minus_log1p_e)
    factor = torch.pow(q, gamma, out=scratch("F", x))
    if gx_out is not None:
        # gamma l s s' (1 - 2 z') / (A + B) into s; dl/dx = A - B into A.
        t = torch.mul(s, s_neg, out=s).div_(q).mul_(ce)
        t.addcmul_(t, z, value=-2)
        a.sub_(b)
    if alpha is not None:
        factor.mul_(torch.add(_ONE[x.dtype] * (1 - alpha), z, alpha=2 * alpha - 1, out=s_neg))
    total = None
    if want_loss:
        loss = torch.mul(factor, ce, out=_loss_buffer(loss_out, x, q))
        total = _weighted_sum(loss, w, loss_out)
    if gx_out is not None:
        a.add_(t, alpha=gamma).mul_(factor)
        _scaled_into(a, gw, gx_out)
        # The ratio is 0/0 where A + B underflows, also where the loss is
        # fine: a NaN (or inf) gradient sends the tile to the reference too.
        grad_total = gx_out.sum().item()
        if not math.isfinite(grad_total):
            return math.nan
        total = grad_total if total is None else total
    return total


def _reference_tile(x, z, w, p, scale, smoothing, x_raw, z_raw, want_loss, loss_out, gx_out, gz_out,
                     focal=None) -> float:
    """One tile by the reference's masked formulas, which define the limits
    (infinite logits, NaN inputs, zero weights masking), into the same
    outputs as `_fast_tile`; the sum of its loss (0 when not asked).
    focal: the reference's (gamma, alpha) tensors, or None."""
    total = 0.0
    if want_loss:
        loss = reference.pointwise(x, z, p, focal)["l"]
        loss = loss if w is None else reference.mul0(w, loss)
        if loss_out is not None:
            loss_out.copy_(loss)
        total = loss.sum().item()
    if gx_out is not None or gz_out is not None:
        gx, gz = reference._input_grads(
            x, z, w, p, scale, smoothing, x_raw, z_raw, gx_out is not None, gz_out is not None, focal)
        for out, g in ((gx_out, gx), (gz_out, gz)):
            if out is not None:
                out.copy_(g)
    return total


def _tiles(x_all: Tensor) -> list[slice | None]:
    """Slices of x_all's first dimension of about TILE elements each, or
    [None] where one tile holds it all (no slicing at all)."""
    numel = x_all.numel()
    if numel <= TILE:
        return [None]
    rows = max(1, TILE // max(1, numel // x_all.shape[0]))
    return [slice(start, start + rows) for start in range(0, x_all.shape[0], rows)]


def _at(t, tile):
    """A tensor's tile; numbers and 0-d coefficients broadcast over every tile."""
    if tile is None or t is None or isinstance(t, float) or t.dim() == 0:
        return t
    return t[tile]


def _run(logits, labels, weight, pos_weight, s: float, c: float, incoming, want_loss, loss, gx, gz,
         gamma=None, alpha=None) -> float:
    """Every tile into the outputs given (None: not asked): the weighted loss
    if `want_loss`, elementwise into `loss` (None: only its sum), and the
    gradients `gx`, `gz` for the chain-rule factor `c` or, for NONE, the
    elementwise incoming gradient `incoming`; s is the label smoothing;
    gamma (0-d): the focal loss, with alpha (0-d) or none. The fast
    formulas run first, and a tile where they fail (NaN in their sum) is
    redone by the reference's. Returns the sum of the weighted loss,
    accumulated over tiles in float64 (0 when not asked)."""
    if cpu_loop.serves(logits, labels, gamma) and (lib := cpu_loop.library()) is not None:
        return cpu_loop.run(lib, logits, labels, weight, pos_weight, s, c, incoming, want_loss, loss, gx, gz)
    ct = compute_dtype(logits.dtype)
    focal = None if gamma is None else reference._focal(gamma, alpha, ct)
    # Read once (CPU tensors: no sync): numbers for the tiles' primitives.
    numbers = None if gamma is None else (float(gamma), None if alpha is None else float(alpha))
    soft_labels = labels.dtype.is_floating_point
    x_all, z_all = logits.contiguous(), labels.contiguous()
    # Flat tiles where every coefficient is a single number; else tiles of
    # whole rows, so that broadcast coefficients are sliced as strided views
    # (and class indices, one per row, with their rows). One tile needs neither.
    flat = ((weight is None or weight.numel() == 1) and (pos_weight is None or pos_weight.numel() == 1)
            and labels.dtype != torch.int64)
    # (class indices need whole rows: 1-D logits are one row, one tile)
    one_tile = x_all.numel() <= TILE or (labels.dtype == torch.int64 and logits.dim() < 2)
    shape = logits.shape if one_tile or not flat else (-1,)
    if not one_tile and flat:
        x_all, z_all = x_all.view(shape), z_all.view(shape)

    def coefficient(t):
        if t is None or isinstance(t, float) or t.shape == logits.shape:
            return t
        return t.reshape(()) if flat else t.expand(logits.shape)

    w = None if weight is None else weight.to(ct)
    p = None if pos_weight is None else pos_weight.to(ct)
    pm1 = None if p is None else p - 1
    gw = c if w is None else w * c
    w, p, pm1, gw = coefficient(w), coefficient(p), coefficient(pm1), coefficient(gw)
    if incoming is not None:
        incoming = incoming.expand(logits.shape).reshape(shape)
    if shape != logits.shape:
        loss, gx, gz = (None if t is None else t.view(shape) for t in (loss, gx, gz))
    half_s = torch.tensor(0.5 * s, dtype=ct) if s else None
    tiles = [None] if one_tile else _tiles(x_all)
    scratch = _Scratch(ct)
    total = 0.0
    for tile in tiles:
        xp, zp = _at(x_all, tile), _at(z_all, tile)
        x, z = _tile_inputs(xp, zp, s, half_s, ct, scratch)
        gwp = gw_tile = _at(gw, tile)
        if incoming is not None:
            gwp = _at(incoming, tile).to(ct)
            gwp = gwp if isinstance(gw_tile, float) and gw_tile == 1.0 else gwp * gw_tile
        outs = _at(loss, tile), _at(gx, tile), _at(gz, tile)
        wp, pp = _at(w, tile), _at(p, tile)
        if focal is None:
            check = _fast_tile(x, z, wp, pp, _at(pm1, tile), gwp, 1 - s, scratch, want_loss, *outs)
        elif soft_labels and not _in_unit_interval(z):
            # 1 - p_t < 0: the reference's log gives NaN, where pow would
            # give a number for an integer gamma.
            check = math.nan
        else:
            check = _focal_tile(x, z, wp, *numbers, gwp, scratch, want_loss, *outs[:2])
        if check != check:
            scale = c if incoming is None else _at(incoming, tile).to(ct)
            check = _reference_tile(x, z, wp, pp, scale, s, xp, zp, want_loss, *outs, focal)
        total += check
    return total if want_loss else 0.0


def _in_unit_interval(z: Tensor) -> bool:
    """Every label of a tile in [0, 1] (NaN counts as in: it propagates)."""
    lo, hi = torch.aminmax(z)
    return not (lo < 0 or hi > 1)


def _tile_inputs(xp, zp, s: float, half_s, ct, scratch):
    """Logits and smoothed labels z' = z (1 - s) + s / 2 of one tile, in the
    compute dtype: the tiles themselves where they already are, else
    converted into scratch (bool and uint8 labels smoothed in that pass).
    int64 class indices become the tile's own one-hot rows (NaN rows for
    an index outside [0, C], as the reference's): a tile's size, never the
    whole (N, C)."""
    x = xp if xp.dtype == ct else scratch("x", xp).copy_(xp)
    if zp.dtype == torch.int64:
        zp = reference.class_index_labels(zp, xp.shape[-1], ct)
    if not s:
        return x, (zp if zp.dtype == ct else scratch("z", zp).copy_(zp))
    if zp.dtype.is_floating_point and zp.dtype != ct:
        # A float16/bfloat16 operand would set the sum's dtype: convert first.
        zp = scratch("z", zp).copy_(zp)
    return x, torch.add(half_s, zp, alpha=1 - s, out=scratch("z", zp))


def _divide(numerator: float, denom: float, reduction: int) -> float:
    """`reference.divide`, on the host."""
    if reduction == R.NONE:
        return numerator
    if denom == 0 and reduction != R.TORCH_MEAN:
        return 0.0  # TF's "no NaN" division
    return numerator / denom


def _denominator(reduction: int, weight: Tensor | None, logits: Tensor, ct) -> tuple[Tensor, float]:
    """`reference.denominator`, and its value on the host (read from the
    weight only where it depends on it)."""
    if reduction in (R.NONE, R.SUM):
        return torch.ones((), dtype=ct), 1.0
    if weight is None or reduction in (R.MEAN_BY_NUMEL, R.TORCH_MEAN):
        return torch.full((), logits.numel(), dtype=ct), float(logits.numel())
    denom = reference.denominator(reduction, weight, logits, ct)
    return denom, denom.item()


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
    *,
    grad_logits_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same contract as `reference.sigmoid_ce_fwd`, grad_logits_out included
    (for the plain loss; each tile writes it only once its logits are
    spent, and only where the fast formulas held, so a tile the reference
    redoes still finds its logits)."""
    if logits.numel() == 0 or _variant(gamma, labels, pos_weight, grad_labels_in_fwd):
        # Nothing to cut into tiles (the reference's NaN or 0), or a variant
        # the tiles do not implement: the reference runs it.
        return reference.sigmoid_ce_fwd(logits, labels, weight, pos_weight, label_smoothing, reduction,
                                          out_dtype, grad_logits_in_fwd, grad_labels_in_fwd,
                                          gamma, alpha, hard_labels, grad_logits_out=grad_logits_out)
    if grad_logits_out is not None and gamma is not None:
        raise ValueError("grad_logits_out is for the plain loss: the focal tiles spend the logits early")
    ct = compute_dtype(logits.dtype)
    denom, d = _denominator(reduction, weight, logits, ct)
    loss = torch.empty(logits.shape, dtype=out_dtype) if reduction == R.NONE else None
    if grad_logits_out is not None:
        grad_logits = grad_logits_out
    else:
        grad_logits = torch.empty(logits.shape if grad_logits_in_fwd else (0,), dtype=logits.dtype)
    grad_labels = torch.empty(labels.shape if grad_labels_in_fwd else (0,), dtype=labels.dtype)
    total = _run(logits, labels, weight, pos_weight, float(label_smoothing), _divide(1.0, d, reduction), None,
                 True, loss, grad_logits if grad_logits_in_fwd else None, grad_labels if grad_labels_in_fwd else None,
                 gamma, alpha)
    if loss is None:
        # From the float64 total (a finite sum beyond float32's range is inf,
        # as the reference's), rounded once to the compute dtype.
        loss = torch.tensor(_divide(total, d, reduction), dtype=ct)
        if out_dtype != ct:  # rounded to the compute dtype first, as the reference's result is
            loss = loss.to(out_dtype)
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
    gamma: Tensor | None = None,
    alpha: Tensor | None = None,
    hard_labels: bool = False,
) -> tuple[Tensor, Tensor]:
    """Same contract as `reference.sigmoid_ce_bwd`."""
    if _variant(gamma, labels, pos_weight, need_grad_labels):
        return reference.sigmoid_ce_bwd(grad, logits, labels, weight, pos_weight, denom, label_smoothing,
                                          reduction, need_grad_logits, need_grad_labels, gamma, alpha, hard_labels)
    grad_logits = torch.empty(logits.shape if need_grad_logits else (0,), dtype=logits.dtype)
    grad_labels = torch.empty(labels.shape if need_grad_labels else (0,), dtype=labels.dtype)
    if not (need_grad_logits or need_grad_labels) or logits.numel() == 0:
        return grad_logits, grad_labels
    # NONE's incoming gradient is elementwise; a reduced loss's is one number.
    incoming = grad if reduction == R.NONE else None
    c = 1.0 if reduction == R.NONE else _divide(grad.item(), denom.item(), reduction)
    _run(logits, labels, weight, pos_weight, float(label_smoothing), c, incoming, False, None,
         grad_logits if need_grad_logits else None, grad_labels if need_grad_labels else None, gamma, alpha)
    return grad_logits, grad_labels


def _variant(gamma: Tensor | None, labels: Tensor, pos_weight: Tensor | None, grad_labels: bool) -> bool:
    """What the tiles do not implement, and the reference runs on CPU
    tensors: the focal loss with a pos_weight or a labels gradient (neither
    is what `fs.sigmoid_focal_loss` asks for)."""
    return gamma is not None and (pos_weight is not None or grad_labels)


def sigmoid_ce_scale_(grad: Tensor, grad_logits: Tensor, grad_labels: Tensor) -> None:
    """Same contract as `reference.sigmoid_ce_scale_`: in place with no
    full-size temporary (the product formed in float32 and rounded once),
    and no pass at all where the incoming gradient is 1 (a training step's)."""
    if grad.numel() == 1 and grad.item() == 1:
        return
    for g in (grad_logits, grad_labels):
        if g.numel():
            g.mul_(grad.to(compute_dtype(g.dtype)))
