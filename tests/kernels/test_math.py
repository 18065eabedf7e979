"""kernels/_math.py: the compiled float32 path's formulas (the cross
entropy's and the focal loss's), run under the interpreter with the SFU
approximations it uses emulated at their error bounds; the log1p polynomial;
and every way a coefficient is read, against float64."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fused_sigxent as fs
from conftest import assert_close, oracle_elementwise, oracle_reduce
from fused_sigxent.op import routes
from fused_sigxent.core import reduction as R
from fused_sigxent.core import layout
from fused_sigxent.kernels import _launch, _grid, _math

FLT_MIN = tl.constexpr(1.1754943508222875e-38)  # the smallest normal float32: .ftz flushes below it
# PTX ISA: ex2.approx.f32 is within 2 ulp (relative 2**-22), rcp.approx.f32
# within 1 ulp (2**-23). The emulations below err by that much, either way.
EX2_ERR, RCP_ERR = 2.0**-22, 2.0**-23
EX2_UP, EX2_DOWN = tl.constexpr(1.0 + EX2_ERR), tl.constexpr(1.0 - EX2_ERR)
RCP_UP, RCP_DOWN = tl.constexpr(1.0 + RCP_ERR), tl.constexpr(1.0 - RCP_ERR)


@triton.jit
def _flush(r):
    return tl.where(r < FLT_MIN, 0.0, r)


@triton.jit
def ex2_up(x):
    return _flush(tl.exp2(x)) * EX2_UP


@triton.jit
def ex2_down(x):
    return _flush(tl.exp2(x)) * EX2_DOWN


@triton.jit
def rcp_up(x):
    return (1.0 / x) * RCP_UP


@triton.jit
def rcp_down(x):
    return (1.0 / x) * RCP_DOWN


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "triton")


@pytest.fixture(params=[(1, 1), (1, -1), (-1, 1), (-1, -1)], ids=["ex2+rcp+", "ex2+rcp-", "ex2-rcp+", "ex2-rcp-"])
def fast_math(request, monkeypatch):
    """The kernels' FAST_MATH path under the interpreter: its inline PTX
    (which the interpreter cannot run) replaced by exact float32 functions
    off by their documented error bound, and the launchers asking for it."""
    ex2_sign, rcp_sign = request.param
    monkeypatch.setattr(_math, "ex2_approx", ex2_up if ex2_sign > 0 else ex2_down)
    monkeypatch.setattr(_math, "rcp_approx", rcp_up if rcp_sign > 0 else rcp_down)
    monkeypatch.setattr(_math, "fast_math", lambda ct: ct == torch.float32)
    yield
    # The launches asked for it (launch plans are made by kernels/_math.py's elementwise_launch).
    assert any(launch.constexprs.get("FAST_MATH") for _, launch in _launch.launches())


def test_log1p_polynomial_error_bound():
    # 2 atanh(t) = t P(t^2), t = e / (2 + e), evaluated as the kernel does in
    # float32 (Horner, then times t), over (0, 1]: denser near 0, where log1p
    # must stay accurate relative to its tiny value.
    e = np.concatenate([np.geomspace(1e-38, 1.0, 200_001), np.linspace(0.0, 1.0, 200_001)[1:]]).astype(np.float32)
    coefficients = [np.float32(c.value) for c in (_math.LOG1P_P0, _math.LOG1P_P1, _math.LOG1P_P2,
                                                    _math.LOG1P_P3, _math.LOG1P_P4)]
    want = np.log1p(e.astype(np.float64))
    for rcp_error in (-RCP_ERR, 0.0, RCP_ERR):
        r = (np.float32(1.0) / (np.float32(2.0) + e)) * np.float32(1.0 + rcp_error)
        t = e * r
        s = t * t
        p = coefficients[4]
        for c in reversed(coefficients[:4]):
            p = c + s * p
        got = (t * p).astype(np.float64)
        # A few float32 roundings and the reciprocal's ulp: well under fp32's 2e-5 tolerance.
        assert np.max(np.abs(got - want) / want) < 6e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_math_path_against_float64(fast_math, dtype):
    # Logits across the range (|x| up to 1e4, where exp(-|x|) flushes to 0),
    # hard and soft labels, pos_weight and smoothing; against float64.
    torch.manual_seed(0)
    x = torch.cat([torch.linspace(-40, 40, 4001), torch.tensor([-1e4, -100.0, -0.0, 0.0, 100.0, 1e4]),
                   torch.randn(1000) * 8]).to(dtype)
    z = torch.cat([torch.rand(2500), (torch.rand(2507) > 0.5).float()]).to(dtype)
    p = torch.rand(x.shape) * 3
    for s in (0.0, 0.1):
        xg, zg = x.clone().requires_grad_(), z.clone().requires_grad_()
        loss = routes.sigmoid_ce(xg, zg, None, p, s, R.NONE, dtype)
        xd, zd = x.double().requires_grad_(), z.double().requires_grad_()
        want = oracle_elementwise(xd, zd, p, s)
        assert_close(loss, want, dtype)
        grad = torch.randn(loss.shape, dtype=torch.float64)
        for g, e in zip(torch.autograd.grad(loss, (xg, zg), grad.to(dtype)), torch.autograd.grad(want, (xd, zd), grad)):
            assert_close(g, e, dtype)
        if dtype == torch.float32:
            # Elementwise relative error, where |x| <= 16 (exp's argument
            # rounding, |x| 2**-24, stays small): a few ulp.
            moderate = x.abs() <= 16
            err = ((loss.double() - want) / want).abs()[moderate]
            assert err.max() < 2e-6, err.max()


def test_fast_math_path_limits_nan_and_masks(fast_math):
    # +-inf logits give the limit, NaN gives NaN, a zero weight masks, and a
    # reduced loss with its gradient in the forward, as on the exact path.
    x = torch.tensor([math.inf, -math.inf, math.inf, -math.inf, 3.0, math.nan, 2.0], requires_grad=True)
    z = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 1.0])
    loss = fs.binary_cross_entropy_with_logits(x, z, reduction="none")
    assert loss[:2].eq(0).all() and loss[2:4].eq(math.inf).all() and torch.isnan(loss[5])
    (gx,) = torch.autograd.grad(loss.sum(), x)
    assert_close(gx[:4], torch.tensor([0.0, 0.0, 1.0, -1.0]))  # within the reciprocal's ulp
    assert torch.isnan(gx[5])
    w = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    masked = fs.sigmoid_cross_entropy(z, x, w, 0.0, fs.Reduction.SUM)
    (gx,) = torch.autograd.grad(masked, x)
    assert torch.isfinite(masked) and gx[w == 0].eq(0).all()
    # A reduced loss whose forward writes the gradient, against the reference.
    xr = torch.randn(3, 1031, requires_grad=True)
    zr, pr = torch.rand(3, 1031), torch.rand(1031) * 3
    got = fs.binary_cross_entropy_with_logits(xr, zr, pos_weight=pr, label_smoothing=0.1)
    (g_got,) = torch.autograd.grad(got, xr)
    xd = xr.double().detach().requires_grad_()
    want = oracle_reduce(oracle_elementwise(xd, zr, pr, 0.1), None, "torch_mean")
    assert_close(got, want, torch.float32)
    assert_close(g_got, torch.autograd.grad(want, xd)[0], torch.float32)


# (rows, classes): 40 classes are a multiple of VEC (vectors within one
# row, vector loads), 37 are not (vectors cross one row end), 5 are fewer than
# VEC (vectors cross two). 129, 150 and 301 rows make more blocks of the
# interpreter's 1024 than its 4 programs, so the class index is stepped along
# the grid stride, and leave a ragged tail. (6, 7, 33) with a middle weight
# keeps three dimensions: flat offsets, divided.
LAYOUT_SHAPES = [(129, 40), (150, 37), (301, 5), (6, 7, 33)]


def _coefficients(shape, kind):
    if kind == "class":
        return torch.rand(shape[-1]) + 0.1
    if kind == "sample":
        return torch.rand(*shape[:-1], 1) + 0.1
    if kind == "full":
        w = torch.rand(shape)
        w[w < 0.2] = 0
        return w
    if kind == "transposed":  # full, strides (1, rows): any strides
        return torch.rand(shape[::-1]).permute(*reversed(range(len(shape))))
    if kind == "middle":
        return torch.rand(1, shape[1], 1) + 0.1
    if kind == "scalar":
        return torch.tensor(0.75)
    return None


# weight, pos_weight: every COEF_* layout over the shapes above.
LAYOUT_CASES = [("class", "class"), ("sample", None), ("full", "class"), ("transposed", "sample"),
                ("scalar", "class"), (None, "sample")]
LAYOUT_CASES_3D = [("middle", "class"), ("class", "middle"), ("full", "middle")]


@pytest.mark.parametrize("shape", LAYOUT_SHAPES)
def test_every_coefficient_layout_against_float64(poisoned, shape):
    seen = set()
    for w_kind, p_kind in LAYOUT_CASES if len(shape) == 2 else LAYOUT_CASES_3D:
        w, p = _coefficients(shape, w_kind), _coefficients(shape, p_kind)
        sizes, _, (sw, sp) = layout.collapse(torch.Size(shape), [w, p])
        nd = layout.ndim(sizes)
        seen |= {_math.coefficient_layout(w, sw, sizes, nd), _math.coefficient_layout(p, sp, sizes, nd)}
        for reduction, name in [(R.NONE, "none"), (R.TORCH_MEAN, "torch_mean"), (R.MEAN_BY_WEIGHTS, "mean")]:
            x = (torch.randn(shape) * 5).requires_grad_()
            z = torch.rand(shape).requires_grad_()
            where = f"{shape}, weight {w_kind}, pos_weight {p_kind}, {name}"
            loss = routes.sigmoid_ce(x, z, w, p, 0.1, reduction, torch.float32)
            xd, zd = x.double().detach().requires_grad_(), z.double().detach().requires_grad_()
            want = oracle_reduce(oracle_elementwise(xd, zd, p, 0.1), w, name)
            assert_close(loss, want, torch.float32, msg=where)
            grad = torch.randn(loss.shape, dtype=torch.float64)
            got = torch.autograd.grad(loss, (x, z), grad.float())
            for g, e in zip(got, torch.autograd.grad(want, (xd, zd), grad)):
                assert_close(g, e, torch.float32, msg=where)
    C = _math
    if len(shape) == 3:
        assert C.COEF_FLAT.value in seen
    elif _math.classes_stepped([1, 1, *shape], 2)[1] == 0:
        assert seen >= {C.COEF_CLASSES.value, C.COEF_ROWS.value, C.COEF_STRIDED.value, C.COEF_SCALAR.value}
    else:
        assert seen >= {C.COEF_CLASSES.value, C.COEF_STRIDED.value, C.COEF_SCALAR.value}


def test_vec_wraps_cover_every_row_end():
    # A vector starting at the last class, VEC elements long, crosses
    # exactly VEC_WRAPS row ends at most.
    for classes in range(2, 40):
        _, wraps = _math.classes_stepped([1, 1, 3, classes], 2)
        crossed = (classes - 1 + _math.VEC.value - 1) // classes
        assert wraps == (0 if classes % _math.VEC.value == 0 else crossed), classes


def test_stepped_layouts_with_int64_offsets(monkeypatch):
    # The int64 path (past INT32_LIMIT) steps the same (row, class) indices.
    x = torch.randn(301, 5, requires_grad=True)
    z, w, p = torch.rand(301, 5), torch.rand(5), torch.rand(301, 1)
    results = []
    for limit in [_grid.INT32_LIMIT, 0]:
        monkeypatch.setattr(_grid, "INT32_LIMIT", limit)
        _launch.PLANS.clear()  # plans made with the other limit would be replayed
        x.grad = None
        loss = fs.binary_cross_entropy_with_logits(x, z, w, "mean", p)
        loss.backward(torch.tensor(0.5))
        results.append((loss.detach(), x.grad.clone()))
        assert {launch.constexprs["INT64"] for _, launch in _launch.launches()} == {limit == 0}
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_half_precision_logits_with_stepped_weights():
    # bf16 logits with uint8 labels and per-class weights (vector loads on a GPU).
    x = (torch.randn(129, 40) * 4).to(torch.bfloat16).requires_grad_()
    z = (torch.rand(129, 40) > 0.7).to(torch.uint8)
    w, p = torch.rand(40), torch.rand(40) * 4
    loss = fs.binary_cross_entropy_with_logits(x, z, w, "mean", p, label_smoothing=0.1)
    xd = x.double().detach().requires_grad_()
    want = oracle_reduce(oracle_elementwise(xd, z.double(), p, 0.1), w, "torch_mean")
    assert_close(loss, want, torch.bfloat16)
    assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(want, xd)[0], torch.bfloat16)


# ---------------------------------------------------------------------------
# The focal loss's FAST_MATH formulas (`_math.focal_soft_labels`: lg2 of
# 1 - p_t and ex2 of the power; `_math.focal_hard_labels`: ex2), on the cross
# entropy's terms (ex2, rcp), run exactly as the kernels run them, in float32
# under the interpreter, each SFU approximation emulated at its documented
# worst case, either way, against torchvision's formula in float64.
#
# lg2.approx.ftz.f32 (PTX ISA; CUDA's __log2f): absolute error <= 2**-22 for
# a in [0.5, 2], 2 ulp (relative 2**-22) elsewhere: emulated as log2(a) off
# by 2**-22 max(1, |log2 a|), which covers both. .ftz: a subnormal a reads
# as 0, so its log2 is -inf (an ex2 result below FLT_MIN is 0: `_flush`).
LG2_ERR = 2.0**-22
LG2_ERR_C = tl.constexpr(LG2_ERR)
FLT_MAX_C = tl.constexpr(3.4028234663852886e38)
U = 2.0**-24  # float32's unit roundoff
FLT_MIN_F = 2.0**-126


@triton.jit
def _lg2_off(a, sign):
    res = tl.log2(tl.where((a > 0) & (a < FLT_MIN), 0.0, a))
    # Finite results off by the bound; -inf (a = 0 or subnormal), +inf and NaN stay.
    return tl.where(tl.abs(res) <= FLT_MAX_C, res + sign * (LG2_ERR_C * tl.maximum(tl.abs(res), 1.0)), res)


@triton.jit
def lg2_up(a):
    return _lg2_off(a, 1.0)


@triton.jit
def lg2_down(a):
    return _lg2_off(a, -1.0)


@triton.jit
def _focal_kernel(x_ptr, z_ptr, gamma_ptr, alpha_ptr, out_ptr, n,
                  HAS_ALPHA: tl.constexpr, HARD_LABELS: tl.constexpr, BLOCK: tl.constexpr):
    """The kernels' elementwise step with FAST_MATH on and no weight or
    pos_weight (`_math.weighted_loss_and_grads`): the focal loss, dL/dx and
    dL/dz', and the cross entropy's l, dl/dx, dl/dz' beside them. gamma and
    alpha per element (a kernel reads one of each: the same arithmetic), so
    one launch takes every gamma."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    gamma = tl.load(gamma_ptr + offs, mask=mask, other=0.0)
    alpha = tl.load(alpha_ptr + offs, mask=mask, other=0.0)
    one = tl.full([BLOCK], 1.0, tl.float32)
    ce, d_ce, d_ce_z, _, _, _ = _math.ce_terms(x, z, one, False, tl.float32, True)
    loss, d_x, d_z = _math.weighted_loss_and_grads(x, z, one, one, gamma, alpha, False, False, True, HAS_ALPHA,
                                                   HARD_LABELS, tl.float32, True)
    tl.store(out_ptr + offs, loss, mask=mask)
    tl.store(out_ptr + n + offs, d_x, mask=mask)
    tl.store(out_ptr + 2 * n + offs, d_z, mask=mask)
    tl.store(out_ptr + 3 * n + offs, ce, mask=mask)
    tl.store(out_ptr + 4 * n + offs, d_ce, mask=mask)
    tl.store(out_ptr + 5 * n + offs, d_ce_z, mask=mask)


FOCAL_GAMMAS = [0.0, 0.5, 1.0, 2.0, 5.0]
# Logits: a dense grid, the stability table's |x| (docs/semantics.md), where
# exp(-|x|) leaves the normals (87.3) and float32 (103.3), and +-inf.
FOCAL_X = torch.cat([
    torch.linspace(-40.0, 40.0, 161),
    torch.tensor([0.0, -0.0, 1e-8, 1.0, 10.0, 30.0, 100.0, 1e4, 0.1, 3.0, 60.0, 87.0, 88.0, 103.0, 104.0, 300.0]),
    -torch.tensor([1e-8, 1.0, 10.0, 30.0, 100.0, 1e4, 0.1, 3.0, 60.0, 87.0, 88.0, 103.0, 104.0, 300.0]),
    torch.tensor([math.inf, -math.inf]),
])
# Soft labels: exactly 0 and 1, and next to them (1 - 2**-24: the nearest
# float32 below 1; 1e-30: a normal far below any ulp of 1).
FOCAL_Z_SOFT = torch.tensor([0.0, 1.0, 0.5, 0.25, 0.75, 0.1, 0.9, 1e-3, 1 - 1e-3, 2.0**-24, 1 - 2.0**-24, 1e-30])
FOCAL_Z_HARD = torch.tensor([0.0, 1.0])
# (ex2, lg2, rcp): each approximation's error up (+1) or down (-1).
EMULATIONS = [(a, b, c) for a in (1, -1) for b in (1, -1) for c in (1, -1)]


def _emulate(monkeypatch, signs):
    ex2_sign, lg2_sign, rcp_sign = signs
    monkeypatch.setattr(_math, "ex2_approx", ex2_up if ex2_sign > 0 else ex2_down)
    monkeypatch.setattr(_math, "lg2_approx", lg2_up if lg2_sign > 0 else lg2_down)
    monkeypatch.setattr(_math, "rcp_approx", rcp_up if rcp_sign > 0 else rcp_down)


def _focal_grid(z_values, alphas):
    """(x, z, gamma, alpha), float32, flat: every combination."""
    g, a, z, x = torch.meshgrid(torch.tensor(FOCAL_GAMMAS), torch.tensor(alphas), z_values, FOCAL_X, indexing="ij")
    return x.flatten(), z.flatten(), g.flatten(), a.flatten()


def _focal_fast(x, z, gamma, alpha, has_alpha, hard):
    n = x.numel()
    out = torch.empty(6, n)
    block = 4096
    _focal_kernel[(triton.cdiv(n, block),)](x, z, gamma, alpha, out, n, HAS_ALPHA=has_alpha, HARD_LABELS=hard,
                                             BLOCK=block)
    return out.double()


def _focal_float64(x, z, gamma, alpha, has_alpha):
    """torchvision's L = alpha_t (1 - p_t)^gamma ce, p_t = p z + (1 - p)(1 - z),
    in float64 and in log space, so it is exact to float64's precision at any
    x (1 - p_t = sigmoid(x) (1 - z) + sigmoid(-x) z: no cancellation), with
    dL/dx and dL/dz' in closed form, and each one's scale: the sum of its
    terms' magnitudes, which the float32 errors are relative to (the terms
    cancel where dl/dx = sigmoid(x) - z is 0). x = +-inf: the limits."""
    x, z, gamma, alpha = x.double(), z.double(), gamma.double(), alpha.double()
    finite = torch.isfinite(x)
    ls, lsn = F.logsigmoid(x), F.logsigmoid(-x)
    s, sn = ls.exp(), lsn.exp()
    ce = -(torch.where(z == 0, 0.0, z * ls) + torch.where(z == 1, 0.0, (1 - z) * lsn))
    log_q = torch.logaddexp(ls + torch.log1p(-z), lsn + torch.log(z))
    factor = torch.where(gamma == 0, 1.0, torch.exp(gamma * log_q))
    alpha_t = alpha * z + (1 - alpha) * (1 - z) if has_alpha else torch.ones_like(x)
    d_alpha_t = 2 * alpha - 1 if has_alpha else torch.zeros_like(x)
    loss = alpha_t * torch.where(factor == 0, 0.0, factor * ce)
    # dF/dx = gamma (1 - p_t)^(gamma - 1) s sn (1 - 2 z), dF/dz' = gamma (1 - p_t)^(gamma - 1) (sn - s).
    # (The scales of the differences 1 - 2 z' and sn - s: 1 + 2 z' and sn + s = 1.)
    live = finite & (gamma > 0)
    d_factor_x_scale = torch.where(live, gamma * torch.exp((gamma - 1) * log_q + ls + lsn), 0.0)
    d_factor_z_scale = torch.where(live, gamma * torch.exp((gamma - 1) * log_q), 0.0)
    d_factor_x, d_factor_z = (1 - 2 * z) * d_factor_x_scale, (sn - s) * d_factor_z_scale
    d_ce_x, d_ce_x_scale = (1 - z) * s - z * sn, (1 - z) * s + z * sn
    ce_finite = torch.where(finite, ce, 0.0)  # ce = inf where dF/dx = 0: the limit's 0
    d_x = alpha_t * (factor * d_ce_x + ce_finite * d_factor_x)
    d_x_scale = alpha_t.abs() * (factor * d_ce_x_scale + ce_finite * (1 + 2 * z) * d_factor_x_scale)
    d_z = alpha_t * (-factor * x + ce * d_factor_z) + d_alpha_t * factor * ce
    d_z_scale = alpha_t.abs() * (factor * x.abs() + ce * d_factor_z_scale) + d_alpha_t.abs() * factor * ce
    return dict(loss=loss, d_x=d_x, d_z=d_z, d_x_scale=d_x_scale, d_z_scale=d_z_scale, ce=ce,
                log2_q=log_q / math.log(2), factor=factor, d_factor_z_scale=d_factor_z_scale)


def _focal_rtol(x, gamma, log2_q, lg2):
    """The relative error bound of the fast focal formulas (lg2: the soft
    labels' lg2 of 1 - p_t; else the hard labels' closed form), from each
    step's error to first order, each approximation at its bound, in units of
    U = 2**-24:
      e = ex2(-|x| log2(e)): 4U (ex2), and 1.25U |x| (log2(e) rounded, the product rounded, times ln 2);
      log1p(e) by the polynomial: 10U (`test_log1p_polynomial_error_bound`); ce: that, e's, 3U more;
      q = 1 - p_t = r a, r = rcp(1 + e): 2U + 1U, a = (1 - y) + y e: 3U and e's;
      log2 q: lg2's 4U max(1, |log2 q|) (soft labels), and q's relative error / ln 2;
      the power ex2(g log2 q), g = gamma or gamma - 1: 4U, plus ln 2 |g| times the exponent's
      absolute error (log2 q's, and the product's rounding, U |g log2 q|);
      the products alpha_t F ce: 5U.
    Summed: 40 + 3 |x| + (1 + gamma) (15 + 1.5 |x| + |log2 q| (+ 3 |log2 q| for lg2)).
    The terms in |x| and |log2 q| are the problem's own conditioning (an exp
    of a rounded argument), not the approximations'; the gradients' extra
    products and reciprocal are within the constants' slack."""
    m = torch.where(torch.isfinite(x), x.abs(), 0.0)
    lq = torch.where(torch.isfinite(log2_q), log2_q.abs(), 0.0)
    return U * (40 + 3 * m + (1 + gamma) * (15 + 1.5 * m + (4 if lg2 else 1) * lq))


def _check_focal(got, want, x, gamma, lg2, what):
    """got within the bound where want is finite (the same infinity where it
    is not); returns the worst error as a fraction of the bound."""
    gamma = gamma.double()
    rtol = _focal_rtol(x.double(), gamma, want["log2_q"], lg2)
    # The floors: below FLT_MIN, ex2.ftz gives 0, so exp(-|x|) (and with it
    # ce = log1p(e) where the label agrees) is known only to FLT_MIN, and so
    # is the power (1 - p_t)^g: each times what multiplies it. (dL/dz' has
    # ce times the unbounded gamma (1 - p_t)^(gamma - 1): relative to dL/dz',
    # gamma / |x| at 87 < |x| < 104, gamma < 1, where e is subnormal.)
    ce = want["ce"].where(torch.isfinite(want["ce"]), 0.0)
    floors = dict(loss=1 + ce, d_x=(1 + gamma) * (1 + ce),
                  d_z=(1 + gamma) * (1 + ce + x.double().abs() + want["d_factor_z_scale"]))
    worst = {}
    for name, scale in [("loss", want["loss"].abs()), ("d_x", want["d_x_scale"]), ("d_z", want["d_z_scale"])]:
        if name not in got:
            continue
        g, w = got[name], want[name]
        finite = torch.isfinite(w)
        if name == "d_z":
            finite &= torch.isfinite(x)  # dL/dz' at x = +-inf: an infinite limit, not checked
        assert torch.isfinite(g[finite]).all(), f"{what} {name}: not finite at x = {x[finite & ~torch.isfinite(g)]}"
        # The infinite limits (x = +-inf against the label), but for a factor
        # (1 - p_t)^gamma that float32 cannot hold (a soft label below
        # FLT_MIN**(1 / gamma) at x = -inf): 0 times inf is 0 there, as on the
        # exact float32 path.
        infinite = torch.isinf(w) & ~((want["factor"] < FLT_MIN_F) & (g == 0))
        assert torch.equal(g[infinite], w[infinite]), f"{what} {name}: at the infinite limits"
        allowed = rtol * scale + 4 * FLT_MIN_F * floors[name]
        err = (g - w).abs()
        ratio = torch.where(finite, err / allowed, 0.0)
        i = int(ratio.argmax())
        assert ratio[i] <= 1, (f"{what} {name}: error {err[i]:.3g} > bound {allowed[i]:.3g} at x = {x[i].item()}, "
                               f"gamma = {gamma[i].item()}, got {g[i].item()}, want {w[i].item()}")
        worst[name] = ratio[i].item()
    return worst


# ex2 of a large exponent (lanes whose power the formula then drops) is inf, silently, on the GPU.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("labels", ["soft", "hard"])
def test_focal_fast_math_within_error_bound(monkeypatch, labels):
    # The focal kernels' FAST_MATH formulas, every emulation sign, against
    # float64: the loss and dL/dx (and dL/dz' for soft labels) within
    # `_focal_rtol`, finite wherever torchvision's limit is, NaN in gives NaN
    # out, and gamma = 0 is the cross entropy times the SFU's 2**0.
    hard = labels == "hard"
    z_values = FOCAL_Z_HARD if hard else FOCAL_Z_SOFT
    emulations = [e for e in EMULATIONS if not hard or e[1] > 0]  # no lg2 for hard labels
    worst = {}
    for has_alpha, alphas in [(False, [0.0]), (True, [0.25, 0.75])]:
        x, z, gamma, alpha = _focal_grid(z_values, alphas)
        # and two NaN logits
        x, z = torch.cat([x, torch.full([2], math.nan)]), torch.cat([z, z_values[:2]])
        gamma, alpha = torch.cat([gamma, torch.tensor([2.0, 0.5])]), torch.cat([alpha, alpha[:2]])
        want = _focal_float64(x, z, gamma, alpha, has_alpha)
        for signs in emulations:
            _emulate(monkeypatch, signs)
            loss, d_x, d_z, ce, d_ce, d_ce_z = _focal_fast(x, z, gamma, alpha, has_alpha, hard)
            what = f"{labels}, alpha {has_alpha}, (ex2, lg2, rcp) {signs}"
            nan = torch.isnan(x)
            assert torch.isnan(loss[nan]).all() and torch.isnan(d_x[nan]).all(), what
            got = dict(loss=loss, d_x=d_x) if hard else dict(loss=loss, d_x=d_x, d_z=d_z)
            ok = ~nan
            for name, ratio in _check_focal({k: v[ok] for k, v in got.items()}, {k: v[ok] for k, v in want.items()},
                                            x[ok], gamma[ok], not hard, what).items():
                worst[name] = max(worst.get(name, 0.0), ratio)
            if not has_alpha:
                # gamma = 0: F = ex2(0) exactly where the formula is the cross entropy's.
                k0 = torch.tensor(1.0 + (EX2_ERR if signs[0] > 0 else -EX2_ERR), dtype=torch.float32).double()
                zero = (gamma == 0) & ok
                assert torch.equal(loss[zero], (ce[zero] * k0).float().double()), what
                assert torch.equal(d_x[zero], (d_ce[zero] * k0).float().double()), what
                if not hard:
                    # (At x = +-inf against the label, gamma ce is 0 inf: NaN, where l's is -+inf.)
                    zero &= torch.isfinite(x)
                    assert torch.equal(d_z[zero], (d_ce_z[zero] * k0).float().double()), what
    print(f"\nfocal {labels}: worst error / bound {worst}")


def test_focal_oracle_is_torchvisions_formula():
    # `_focal_float64` against torchvision's formula as written, with
    # autograd, where that is accurate (|x| <= 8: no cancellation in 1 - p_t
    # to speak of, and gamma >= 1 or p_t < 1, so pow's derivative is finite).
    x = torch.linspace(-8, 8, 161, dtype=torch.float64)
    for gamma in FOCAL_GAMMAS:
        for alpha in [-1.0, 0.25]:
            for z0 in [0.0, 0.3, 1.0]:
                xd = x.clone().requires_grad_()
                zd = torch.full_like(x, z0, requires_grad=True)
                p = torch.sigmoid(xd)
                ce = F.binary_cross_entropy_with_logits(xd, zd, reduction="none")
                p_t = p * zd + (1 - p) * (1 - zd)
                loss = ce * (1 - p_t) ** gamma
                if alpha >= 0:
                    loss = (alpha * zd + (1 - alpha) * (1 - zd)) * loss
                d_x, d_z = torch.autograd.grad(loss.sum(), (xd, zd))
                g, a = torch.full_like(x, gamma), torch.full_like(x, max(alpha, 0.0))
                want = _focal_float64(x, zd.detach(), g, a, alpha >= 0)
                torch.testing.assert_close(want["loss"], loss.detach(), rtol=1e-9, atol=1e-12)
                torch.testing.assert_close(want["d_x"], d_x, rtol=1e-9, atol=1e-12)
                torch.testing.assert_close(want["d_z"], d_z, rtol=1e-9, atol=1e-12)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
def test_focal_fast_math_subnormal_soft_labels(monkeypatch):
    # A soft label below FLT_MIN (float32 or bfloat16 targets) against a
    # confident logit (e = exp(-|x|) flushed by ex2.ftz): 1 - p_t is that
    # subnormal label, which lg2.approx.ftz would read as 0 (-inf, then NaN
    # or inf powers) but for the floor at FLT_MIN; the float32 values are 0
    # or tiny, never NaN.
    x = torch.tensor([-88.0, -100.0, -1e4, -30.0]).repeat(len(FOCAL_GAMMAS))
    gamma = torch.tensor(FOCAL_GAMMAS).repeat_interleave(4)
    z, alpha = torch.full_like(x, 1e-40), torch.zeros_like(x)
    for signs in EMULATIONS:
        _emulate(monkeypatch, signs)
        loss, d_x, d_z = _focal_fast(x, z, gamma, alpha, False, False)[:3]
        assert torch.isfinite(loss).all() and torch.isfinite(d_x).all() and torch.isfinite(d_z).all(), signs
