"""kernels/_math.py: the compiled float32 path's formulas, run under the
interpreter with the SFU approximations it uses emulated at their error
bounds; the log1p polynomial; and every way a coefficient is read, against
float64."""

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import fused_sigxent as fs
from conftest import assert_close, oracle_elementwise, oracle_reduce
from fused_sigxent import _op
from fused_sigxent import _reduction as R
from fused_sigxent.kernels import _layout, _math, sigmoid_ce_bwd, sigmoid_ce_fwd

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
    for module in (sigmoid_ce_fwd, sigmoid_ce_bwd):
        monkeypatch.setattr(module, "fast_math", lambda ct: ct == torch.float32)


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
        loss = _op.sigmoid_ce(xg, zg, None, p, s, R.NONE, dtype)
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


# (rows, classes): 40 classes are a multiple of CHUNK (chunks within one
# row, vector loads), 37 are not (chunks cross one row end), 5 are fewer than
# CHUNK (chunks cross two). 129, 150 and 301 rows make more blocks of the
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
        sizes, _, (sw, sp) = _layout.collapse(torch.Size(shape), [w, p])
        nd = _layout.ndim(sizes)
        seen |= {_math.coefficient_layout(w, sw, sizes, nd), _math.coefficient_layout(p, sp, sizes, nd)}
        for reduction, name in [(R.NONE, "none"), (R.TORCH_MEAN, "torch_mean"), (R.MEAN_BY_WEIGHTS, "mean")]:
            x = (torch.randn(shape) * 5).requires_grad_()
            z = torch.rand(shape).requires_grad_()
            where = f"{shape}, weight {w_kind}, pos_weight {p_kind}, {name}"
            loss = _op.sigmoid_ce(x, z, w, p, 0.1, reduction, torch.float32)
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


def test_chunk_wraps_cover_every_row_end():
    # A chunk starting at the last class, CHUNK elements long, crosses
    # exactly CHUNK_WRAPS row ends at most.
    for classes in range(2, 40):
        _, wraps = _math.classes_stepped([1, 1, 3, classes], 2)
        crossed = (classes - 1 + _math.CHUNK.value - 1) // classes
        assert wraps == (0 if classes % _math.CHUNK.value == 0 else crossed), classes


def test_stepped_layouts_with_int64_offsets(monkeypatch):
    # The int64 path (past INT32_LIMIT) steps the same (row, class) indices.
    x = torch.randn(301, 5, requires_grad=True)
    z, w, p = torch.rand(301, 5), torch.rand(5), torch.rand(301, 1)
    results = []
    for limit in [_layout.INT32_LIMIT, 0]:
        monkeypatch.setattr(_layout, "INT32_LIMIT", limit)
        x.grad = None
        loss = fs.binary_cross_entropy_with_logits(x, z, w, "mean", p)
        loss.backward(torch.tensor(0.5))
        results.append((loss.detach(), x.grad.clone()))
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
