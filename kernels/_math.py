"""Device functions shared by the sigmoid cross entropy kernels: the block
layout, loads through broadcast strides (with no per-element integer
division for a (rows, classes) broadcast), and the stable loss and gradient
formulas of `fused_sigxent/impl/reference.py`, term for term."""

import torch
import triton
import triton.language as tl

from fused_sigxent.core import layout
from fused_sigxent.core.backend import interpreting
from fused_sigxent.core.dtypes import compute_dtype

from . import _grid
from ._configs import numel_class

# The op's reduction codes (fused_sigxent/_reduction.py); constexpr copies for the kernels.
NONE = tl.constexpr(0)
SUM = tl.constexpr(1)
MEAN_BY_WEIGHTS = tl.constexpr(2)
MEAN_BY_NUMEL = tl.constexpr(3)
MEAN_BY_NONZERO = tl.constexpr(4)
TORCH_MEAN = tl.constexpr(5)

# How a coefficient (weight, pos_weight) is read: the kernels' W_LAYOUT and
# PW_LAYOUT, chosen by `coefficient_layout` from the collapsed strides.
COEF_NONE = tl.constexpr(0)  # absent: 1.0
COEF_SCALAR = tl.constexpr(1)  # one element, loaded once per program
COEF_FLAT = tl.constexpr(2)  # offsets from the flat index (integer divisions where NDIM > 2)
COEF_CLASSES = tl.constexpr(3)  # (rows, classes), contiguous along classes: VEC-wide vector loads
# (where VEC divides the classes; else one load per element of a per-class vector)
COEF_ROWS = tl.constexpr(4)  # (rows, classes), constant along classes: one load per vector
COEF_STRIDED = tl.constexpr(5)  # (rows, classes), any strides or rows straddled: one load per element
# Consecutive elements a thread takes as one vector when coefficients are
# stepped over (rows, classes): 8 is one 16-byte access of bf16 logits, two of
# fp32. The per-vector layouts need a multiple of VEC classes (no vector
# straddles two rows).
VEC = tl.constexpr(8)

LOG2E = tl.constexpr(1.4426950408889634)
# A finite stand-in for log2(0) in the focal factor's exponent (2**-1e30 is 0,
# and 0 times it is 0, not NaN).
LOG2_FLOOR = tl.constexpr(-1e30)
FLT_MAX = tl.constexpr(3.4028234663852886e38)
FLT_MIN_BITS = tl.constexpr(0x00800000)  # FLT_MIN's: below them, as unsigned, +0 and the subnormals
# log1p(e) for e in [0, 1] as 2 atanh(t), t = e / (2 + e) in [0, 1/3]:
# 2 atanh(t) = t * P(t^2), P of degree 4 fitted (Lawson's minimax) to
# 2 atanh(sqrt(s)) / sqrt(s) on s in [0, 1/9]: relative error 8e-9 in exact
# arithmetic, 2.4e-7 (2 ulp) evaluated in float32 with a correctly rounded
# reciprocal; tests/kernels/test_math.py checks it with rcp.approx's ulp too.
LOG1P_P0 = tl.constexpr(2.0)
LOG1P_P1 = tl.constexpr(0.66666314)
LOG1P_P2 = tl.constexpr(0.4002491)
LOG1P_P3 = tl.constexpr(0.27960604)
LOG1P_P4 = tl.constexpr(0.28178334)


def coefficient_layout(coefficient, strides: list[int], sizes: list[int], ndim: int) -> int:
    """Host side: the COEF_* code for a coefficient (None, or a tensor with its
    strides over the collapsed sizes d0..d3, NDIM of them used)."""
    if coefficient is None:
        return COEF_NONE.value
    if coefficient.numel() == 1:
        return COEF_SCALAR.value
    stepped, wraps = classes_stepped(sizes, ndim)
    aligned = wraps == 0
    if not stepped:
        return COEF_FLAT.value
    s_rows, s_classes = strides[2], strides[3]
    if s_classes == 1 and (s_rows % VEC.value == 0 if aligned else s_rows == 0):
        return COEF_CLASSES.value
    if aligned and s_classes == 0:
        return COEF_ROWS.value
    return COEF_STRIDED.value


def classes_stepped(sizes: list[int], ndim: int) -> tuple[bool, int]:
    """Host side: the kernels' (STEP_CLASSES, VEC_WRAPS). Indices are
    stepped per vector over two collapsed dimensions (rows, d3 classes);
    VEC_WRAPS is how many row ends a vector can cross: 0 where VEC divides
    d3, else 1 + (VEC - 2) // d3 (a vector starting at class d3 - 1 ends at
    class d3 - 1 + VEC - 1)."""
    if ndim != 2:
        return False, 0
    d3 = sizes[3]
    return True, 0 if d3 % VEC.value == 0 else 1 + (VEC.value - 2) // d3


def fast_math(compute_dtype: torch.dtype) -> bool:
    """Host side: the kernels' FAST_MATH: float32 math, compiled (the
    interpreter cannot run inline PTX; float64 stays exact)."""
    return compute_dtype == torch.float32 and not interpreting()


@triton.jit
def mul0(a, b):
    """a * b with 0 * anything = 0 (a zero weight masks an infinite loss)."""
    return tl.where(a == 0, 0.0, a * b)


@triton.jit
def ex2_approx(x):
    """2**x by the SFU (PTX ex2.approx.ftz.f32): relative error <= 2**-22,
    subnormal results flushed to 0; -inf gives 0, NaN gives NaN."""
    return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def rcp_approx(x):
    """1 / x by the SFU (PTX rcp.approx.ftz.f32): error <= 1 ulp."""
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def lg2_approx(x):
    """log2(x) by the SFU (PTX lg2.approx.ftz.f32): absolute error <= 2**-22.
    for x in [0.5, 2], relative 2**-22 elsewhere; subnormal x read as 0 (-inf)."""
    return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def exp_any(t, FAST_MATH: tl.constexpr):
    """exp(t): the focal factor's powers (t <= 0)."""
    if FAST_MATH:
        res = ex2_approx(t * LOG2E)
    else:
        res = tl.exp(t)
    return res


@triton.jit
def exp2_any(t, FAST_MATH: tl.constexpr):
    """2**t: the focal factor's powers, taken in log2 units (the SFU's)."""
    if FAST_MATH:
        res = ex2_approx(t)
    else:
        res = tl.exp2(t)
    return res


@triton.jit
def log2_any(a, FAST_MATH: tl.constexpr):
    """log2(a) for a >= 0 (NaN for a < 0 or NaN). lg2.approx.ftz reads a
    subnormal a (a soft label below FLT_MIN against an e that ex2.ftz
    flushed) as 0: -inf, then NaN or inf powers. So a is first raised to
    FLT_MIN by one unsigned max of its bits, which leaves a negative a
    (labels outside [0, 1]) negative and NaN NaN: their log is NaN, as the
    reference's. The exact path needs none of it."""
    if FAST_MATH:
        res = lg2_approx(tl.maximum(a.to(tl.uint32, bitcast=True), FLT_MIN_BITS).to(tl.float32, bitcast=True))
    else:
        res = tl.log2(a)
    return res


@triton.jit
def exp_neg_abs(x, FAST_MATH: tl.constexpr):
    """exp(-|x|), in (0, 1]: never overflows."""
    if FAST_MATH:
        e = ex2_approx(tl.abs(x) * -LOG2E)
    else:
        e = tl.exp(-tl.abs(x))
    return e


@triton.jit
def reciprocal(u, FAST_MATH: tl.constexpr):
    """1 / u for u in [1, 3]."""
    if FAST_MATH:
        r = rcp_approx(u)
    else:
        r = 1.0 / u
    return r


@triton.jit
def log1p_small(e):
    """log(1 + e) for e in [0, 1], accurate where 1 + e rounds (Goldberg's trick:
    the rounding error of u = 1 + e cancels in log(u) / (u - 1))."""
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))


@triton.jit
def log1p_unit(e, CT: tl.constexpr, FAST_MATH: tl.constexpr):
    """log(1 + e) for e in [0, 1]. float64: libdevice's log (exact path).
    float32: 2 atanh(e / (2 + e)) by a polynomial, no log at all; relative
    error a few ulp, with FAST_MATH's reciprocal too (tests/kernels/test_math.py)."""
    if CT == tl.float64:
        res = log1p_small(e)
    else:
        t = e * reciprocal(2.0 + e, FAST_MATH)
        s = t * t
        res = t * (LOG1P_P0 + s * (LOG1P_P1 + s * (LOG1P_P2 + s * (LOG1P_P3 + s * LOG1P_P4))))
    return res


@triton.jit
def coefficient_offsets(offs, d1, d2, d3, s0, s1, s2, s3, NDIM: tl.constexpr):
    """Offsets into a coefficient (weight, pos_weight) broadcast to the logits.

    offs: flat indices into the contiguous logits, whose shape is collapsed to
    (d0, d1, d2, d3) (innermost last, NDIM of them used); s0..s3: the
    coefficient's strides over those dimensions, 0 where it is broadcast.
    """
    if NDIM == 1:
        res = offs * s3
    elif NDIM == 2:
        res = (offs // d3) * s2 + (offs % d3) * s3
    elif NDIM == 3:
        r = offs // d3
        res = (r // d2) * s1 + (r % d2) * s2 + (offs % d3) * s3
    else:
        r = offs // d3
        r2 = r // d2
        res = (r2 // d1) * s0 + (r2 % d1) * s1 + (r % d2) * s2 + (offs % d3) * s3
    return res


@triton.jit
def stepped_indices(start, step, d3, STEP_CLASSES: tl.constexpr, VEC_: tl.constexpr, BLOCK: tl.constexpr):
    """(row, class) of the first element of each vector of the block at
    `start`, over two collapsed dimensions (rows, d3 classes), and the
    (rows, classes) one grid stride `step` spans: divisions once per program,
    which `step_rows_classes` then avoids. Zeros (unused) unless STEP_CLASSES."""
    if STEP_CLASSES:
        first = start + tl.arange(0, BLOCK // VEC_) * VEC_
        row, col = first // d3, first % d3
        d_row, d_col = step // d3, step % d3
    else:
        row = tl.zeros([BLOCK // VEC_], tl.int32)
        col = tl.zeros([BLOCK // VEC_], tl.int32)
        d_row, d_col = 0, 0
    return row, col, d_row, d_col


@triton.jit
def step_rows_classes(row, col, d_row, d_col, d3):
    """(row, class) of each vector one grid stride on, d_row = step // d3 and
    d_col = step % d3: a compare and two adds per vector, no division."""
    col = col + d_col
    wrap = col >= d3
    return row + d_row + wrap.to(row.dtype), tl.where(wrap, col - d3, col)


@triton.jit
def element_rows_classes(row, col, d3, VEC_WRAPS: tl.constexpr, VEC_: tl.constexpr):
    """(row, class) of every element of each vector, from the vector's first:
    class + j, carried past the row end at most VEC_WRAPS times (a compare
    and two adds each, no division)."""
    col_j = col[:, None] + tl.arange(0, VEC_)[None, :]
    row_j = row[:, None] + tl.zeros_like(col_j)
    for _ in tl.static_range(VEC_WRAPS):
        wrap = col_j >= d3
        col_j = tl.where(wrap, col_j - d3, col_j)
        row_j = row_j + wrap.to(row_j.dtype)
    return row_j, col_j


@triton.jit
def load_coefficient(ptr, scalar, offs, mask, row, col, d1, d2, d3, s0, s1, s2, s3,
                     LAYOUT: tl.constexpr, NDIM: tl.constexpr, VEC_WRAPS: tl.constexpr, MASKED: tl.constexpr,
                     CT: tl.constexpr, VEC_: tl.constexpr):
    """A coefficient at the block's elements (flat offsets offs, [BLOCK // VEC_, VEC_];
    only COEF_FLAT reads them, so the others cost nothing for them),
    upcast to the compute dtype, 0 where masked; 1.0 when absent. row, col:
    each vector's (row, class) where LAYOUT steps them; scalar: the value of a
    one-element coefficient."""
    if LAYOUT == COEF_NONE:
        res = tl.full(offs.shape, 1.0, CT)
    elif LAYOUT == COEF_SCALAR:
        res = tl.full(offs.shape, 1.0, CT) * scalar
    elif LAYOUT == COEF_FLAT:
        coef_offs = coefficient_offsets(offs, d1, d2, d3, s0, s1, s2, s3, NDIM)
        res = tl.load(ptr + coef_offs, mask=mask, other=0).to(CT)
    elif LAYOUT == COEF_CLASSES:
        if VEC_WRAPS == 0:
            # Classes contiguous, each vector within one row and VEC-aligned
            # (the host checked d3 and the row stride): vector loads.
            base = tl.multiple_of(row * s2 + col, VEC_)
            res = tl.load(ptr + base[:, None] + tl.arange(0, VEC_)[None, :], mask=mask, other=0).to(CT)
        else:
            # One vector over the classes (row stride 0): a vector running
            # past the last class goes on from the first.
            _, col_j = element_rows_classes(row, col, d3, VEC_WRAPS, VEC_)
            res = tl.load(ptr + col_j, mask=mask, other=0).to(CT)
    elif LAYOUT == COEF_ROWS:
        # Constant along classes: one value per vector, broadcast. (Vectors of
        # the tail block past the last row read the last row, then masked.)
        if MASKED:
            row = tl.minimum(row, d2 - 1)
        base = row * s2
        res = tl.load(ptr + base)[:, None].to(CT) * tl.full(offs.shape, 1.0, CT)
    else:
        if VEC_WRAPS == 0:
            coef_offs = (row * s2 + col * s3)[:, None] + tl.arange(0, VEC_)[None, :] * s3
        else:
            row_j, col_j = element_rows_classes(row, col, d3, VEC_WRAPS, VEC_)
            coef_offs = row_j * s2 + col_j * s3
        res = tl.load(ptr + coef_offs, mask=mask, other=0).to(CT)
    if MASKED:
        res = tl.where(mask, res, 0.0)
    return res


@triton.jit
def load_scalar(ptr, LAYOUT: tl.constexpr, CT: tl.constexpr):
    """A one-element coefficient's value (1.0 for any other layout: unused)."""
    if LAYOUT == COEF_SCALAR:
        res = tl.load(ptr).to(CT)
    else:
        res = tl.full([], 1.0, CT)
    return res


@triton.jit
def smoothing(smoothing_ptr, CT: tl.constexpr):
    """The label smoothing s, read from a 0-d tensor of the compute dtype: it
    travels as data, so a new value is neither a new kernel specialization
    nor (under torch.compile) a recompile."""
    return tl.load(smoothing_ptr).to(CT)


@triton.jit
def focal_parameters(gamma_ptr, alpha_ptr, FOCAL: tl.constexpr, HAS_ALPHA: tl.constexpr, CT: tl.constexpr):
    """The focal loss's (gamma, alpha), read once per program from 0-d tensors
    (data, like the smoothing); 0.0 where unused."""
    gamma = tl.full([], 0.0, CT)
    alpha = tl.full([], 0.0, CT)
    if FOCAL:
        gamma = tl.load(gamma_ptr).to(CT)
        if HAS_ALPHA:
            alpha = tl.load(alpha_ptr).to(CT)
    return gamma, alpha


def focal_pointers(smoothing, gamma, alpha) -> tuple:
    """Host side, every call: the kernels' (gamma_ptr, alpha_ptr). Absent
    scalars point at the smoothing (never read), so pointer dtypes, and so
    the tuner's variants, are those of the plain loss."""
    return smoothing if gamma is None else gamma, smoothing if gamma is None or alpha is None else alpha


def elementwise_launch(kernel: str, x, z, weight, pos_weight, gamma, alpha, hard_labels: bool):
    """Host side, once per launch plan (kernels/_launch.py): what the forward
    and backward kernels both take for contiguous logits x and labels z.
    Returns their scalar arguments (n_elements, numel class, d1..d3, n_cols,
    the coefficients' strides), the constexprs they share (coefficient
    layouts, stepping, the focal loss's FOCAL, HAS_ALPHA, HARD_LABELS and
    CLASS_INDEX, INT64, CT, FAST_MATH), and `layout.collapse_plan`'s
    coefficient materializer (None: the coefficients as given)."""
    n = x.numel()
    ct = compute_dtype(x.dtype)
    class_index = z.dtype == torch.int64
    sizes, (w, pw), (stride_w, stride_pw), collapsed = layout.collapse_plan(
        x.shape, [weight, pos_weight], classes_apart=class_index)
    nd = layout.ndim(sizes)
    step_classes, vec_wraps = classes_stepped(sizes, nd)
    n_cols = max(1, x.shape[-1]) if x.dim() else 1
    scalars = (n, numel_class(kernel, n), sizes[1], sizes[2], sizes[3], n_cols, *stride_w, *stride_pw)
    flags = dict(
        W_LAYOUT=coefficient_layout(w, stride_w, sizes, nd), PW_LAYOUT=coefficient_layout(pw, stride_pw, sizes, nd),
        NDIM=nd, STEP_CLASSES=step_classes, VEC_WRAPS=vec_wraps,
        FOCAL=gamma is not None, HAS_ALPHA=gamma is not None and alpha is not None,
        HARD_LABELS=gamma is not None and hard_labels, CLASS_INDEX=class_index,
        INT64=n >= _grid.INT32_LIMIT, CT=tl.float64 if ct == torch.float64 else tl.float32, FAST_MATH=fast_math(ct),
    )
    return scalars, flags, collapsed


@triton.jit
def loss_and_grads(x, z, p, HAS_POS_WEIGHT: tl.constexpr, CT: tl.constexpr, FAST_MATH: tl.constexpr):
    """Elementwise loss l, dl/dx and dl/dz' (z' the smoothed label, p pos_weight): see `ce_terms`."""
    loss, d_logits, d_labels, _, _, _ = ce_terms(x, z, p, HAS_POS_WEIGHT, CT, FAST_MATH)
    return loss, d_logits, d_labels


@triton.jit
def ce_terms(x, z, p, HAS_POS_WEIGHT: tl.constexpr, CT: tl.constexpr, FAST_MATH: tl.constexpr):
    """Elementwise loss l, dl/dx and dl/dz' (z' the smoothed label, p pos_weight),
    and the pieces the focal factor reuses: e = exp(-|x|), r = 1 / (1 + e) =
    sigmoid(|x|), log1p(e).

    stable loss: l = (1 - z') relu(x) + p z' relu(-x) + q log1p(exp(-|x|)), q = 1 + (p - 1) z'
    (p = 1: max(x, 0) - x z' + log1p(exp(-|x|)))
    dl/dx  = (1 - z') sigmoid(x) - p z' sigmoid(-x)
    dl/dz' = -relu(x) + p relu(-x) + (p - 1) log1p(exp(-|x|))

    Written with one select per term: relu(x) and relu(-x) are x and 0 or 0
    and -x, so the relu terms are c x, c = 1 - z' (x >= 0) or -p z' (x < 0),
    and a zero c masks x = +-inf (0 * inf would be NaN); with e = exp(-|x|)
    and r = 1 / (1 + e), sigmoid(x) is r or e r, so
    dl/dx = r ((1 - z') - p z' e) for x >= 0, r ((1 - z') e - p z') for x < 0.
    """
    # One exp serves both sigmoids and the log term: e = exp(-|x|) never overflows.
    e = exp_neg_abs(x, FAST_MATH)
    r = reciprocal(1.0 + e, FAST_MATH)
    log_term = log1p_unit(e, CT, FAST_MATH)
    pos = x >= 0
    one_minus_z = 1.0 - z
    if HAS_POS_WEIGHT:
        pz = p * z
        q_log = (1.0 + (p - 1.0) * z) * log_term
        # dl/dz': -x or -p x (a zero p masks x = -inf), plus (p - 1) log1p(e).
        k = tl.where(pos, 1.0, p)
        d_labels = tl.where(k == 0, 0.0, -(k * x)) + (p - 1.0) * log_term
    else:
        pz = z
        q_log = log_term
        d_labels = -x
    c = tl.where(pos, one_minus_z, -pz)
    loss = tl.where(c == 0, q_log, c * x + q_log)
    d_logits = r * tl.where(pos, one_minus_z - pz * e, one_minus_z * e - pz)
    return loss, d_logits, d_labels, e, r, log_term


@triton.jit
def focal_soft_labels(x, z, e, r, log_term, ce, d_ce, d_ce_z, gamma, alpha, HAS_ALPHA: tl.constexpr,
                      HARD_LABELS: tl.constexpr, FAST_MATH: tl.constexpr):
    """(L, dL/dx, dL/dz') of the focal loss L = alpha_t F ce, F = (1 - p_t)^gamma,
    from the cross entropy's ce, dce/dx, dce/dz' (any label, any pos_weight;
    `focal_hard_labels` is the cheaper closed form for hard labels without).

    In log space, as `_reference.focal_factor`: with y = z' (x >= 0) or 1 - z',
    q = 1 - p_t = r a, a = (1 - y) + y e, log q = log(r e) = -|x| - log1p(e)
    where y = 1 (however small e is); dq/dx = (1 - 2 z') e r^2, dq/dz' = -+(1 - e) r.
    One exp serves F and dF/dx, with no division: P = q^(gamma - 1), so
    F = P q and dF/dx = gamma P e r^2 (1 - 2 z'). That power is bounded where
    y < 1 (q >= r (1 - y), and 1 - y is 0 or at least an ulp of 1), but
    infinite for gamma < 1 where y = 1 and e underflows. There ("direct")
    the exp is taken of gamma log q and is F itself, and e r^2 / q = r; so
    too for gamma = 0, where F must be exactly 1 (the cross entropy, bit for
    bit) and dF is 0 anyway.

    Cost beyond the cross entropy: for soft labels a log (of q) and that
    exp, and no fewer: q = r ((1 - y) + y e) is a sum of two terms weighted
    by the label, so log q, which the power needs, is no function of the
    cross entropy's terms (exp(-|x|), 1 / (1 + e), log1p(e)); the SFU's lg2
    and ex2 are the two. HARD_LABELS: log q is a select, one exp. The label
    gradient needs F / a = r q^(gamma - 1), which "direct" lanes did not
    take: one more exp, where it is asked for."""
    pos = x >= 0
    one_minus_z = 1.0 - z
    a = tl.where(pos, one_minus_z + z * e, z + one_minus_z * e)
    q = r * a
    # y = 1 gives a = e exactly, and a = e gives e / a = 1 and q = r e exactly:
    # the test ("direct", with gamma = 0) costs one compare, with no y formed
    # (x = 0, e = 1 = a, passes it too, rightly: q = r e there).
    # (a select, not (a == e) | (gamma == 0): the interpreter cannot or a scalar compare into a block)
    direct = tl.where(gamma == 0, True, a == e)
    # log2 q where a = e: -|x| log2(e) - log2(1 + e), floored (NaN kept) so
    # that gamma = 0 times it is 0 at x = +-inf, not NaN. The product is the
    # one exp_neg_abs takes. Where gamma = 0 and a != e it is a wrong but
    # finite log2 q, which only meets factors of gamma.
    log2_direct = tl.maximum(tl.abs(x) * -LOG2E, LOG2_FLOOR, propagate_nan=tl.PropagateNan.ALL) - log_term * LOG2E
    if HARD_LABELS:
        log2_q = tl.where(direct, log2_direct, log_term * -LOG2E)  # y = 0: q = r
    else:
        log2_q = tl.where(direct, log2_direct, log2_any(q, FAST_MATH))
    power = exp2_any(tl.where(direct, gamma, gamma - 1.0) * log2_q, FAST_MATH)
    # F = power q_or_1, dF/dx = gamma (1 - 2 z') power slope
    q_or_1 = tl.where(direct, 1.0, q)
    slope = r * tl.where(direct, 1.0, e * r)
    if HAS_ALPHA:
        a_t = (1.0 - alpha) + (2.0 * alpha - 1.0) * z
        k = a_t * power
    else:
        k = power
    # Masked where ce = inf (x = +-inf against its label): k may be 0 there.
    loss = mul0(k, q_or_1 * ce)
    # There the slope is 0 (e = 0) or gamma is: ce capped, 0 times it is 0.
    finite_ce = tl.minimum(ce, FLT_MAX, propagate_nan=tl.PropagateNan.ALL)
    d_logits = k * (q_or_1 * d_ce + (gamma + (-2.0 * gamma) * z) * slope * finite_ce)
    factor = power * q_or_1
    sign = tl.where(pos, -1.0, 1.0)
    # gamma ce first: F / a overflows where y = 1 (gamma < 1, e = 0: ce is 0
    # there) or where gamma = 0 took a wrong log2 q.
    d_f_z = mul0(gamma * ce, sign * (1.0 - e) * r * exp2_any((gamma - 1.0) * log2_q, FAST_MATH))
    d_labels = mul0(factor, d_ce_z) + d_f_z
    if HAS_ALPHA:
        d_labels = mul0(a_t, d_labels) + (2.0 * alpha - 1.0) * mul0(factor, ce)
    return loss, d_logits, d_labels


@triton.jit
def grid_stride(n_elements, INT64: tl.constexpr, BLOCK: tl.constexpr):
    """This program's share of a persistent grid: blocks first, first + step, ...
    below n_full (the whole blocks), and whether it also takes the ragged tail
    block at n_full (the program whose turn it would be). int64 offsets only
    where numel, plus one grid stride, passes int32."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    if INT64:
        first = pid.to(tl.int64) * BLOCK
        step = n_programs.to(tl.int64) * BLOCK
    else:
        first = pid * BLOCK
        step = n_programs * BLOCK
    n_full = (n_elements // BLOCK) * BLOCK
    owns_tail = (n_full < n_elements) & (pid == (n_full // BLOCK) % n_programs)
    return first, step, n_full, owns_tail


@triton.jit
def block_mask(offs, n_elements, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """offs < n_elements for the tail block; for whole blocks a constant mask,
    which folds away and leaves the accesses unpredicated 16-byte vectors."""
    if MASKED:
        mask = offs < n_elements
    else:
        mask = tl.full(offs.shape, 1, tl.int1)
    return mask


@triton.jit
def block_lanes(VEC_: tl.constexpr, BLOCK: tl.constexpr):
    """Offsets within a block, int32, as [BLOCK // VEC_, VEC_]: vectors of
    VEC_ consecutive elements (one vector of BLOCK where no coefficient is
    stepped per vector, the plain 1-D block). Pointers are formed as
    ptr + start + lanes: one scalar (maybe int64) add per block, int32 lanes."""
    return tl.arange(0, BLOCK // VEC_)[:, None] * VEC_ + tl.arange(0, VEC_)[None, :]


@triton.jit
def load_block(
    start, row, col, logits_ptr, labels_ptr, weight_ptr, pos_weight_ptr, w_scalar, pw_scalar,
    n_elements, d1, d2, d3,
    stride_w_0, stride_w_1, stride_w_2, stride_w_3, stride_pw_0, stride_pw_1, stride_pw_2, stride_pw_3,
    s, n_cols,
    W_LAYOUT: tl.constexpr, PW_LAYOUT: tl.constexpr, NDIM: tl.constexpr, VEC_WRAPS: tl.constexpr,
    CLASS_INDEX: tl.constexpr, MASKED: tl.constexpr, CT: tl.constexpr, VEC_: tl.constexpr, BLOCK: tl.constexpr,
):
    """Lanes (block_lanes), mask and inputs of the block at `start`, upcast
    to the compute dtype: x, the smoothed label z' = z (1 - s) + 0.5 s, the
    weight w and pos_weight p (1.0 when absent; 0 where masked).
    CLASS_INDEX: labels_ptr holds one int64 class index per row of n_cols
    logits; z is 1 where the column is the row's index (see `class_index_label`)."""
    lanes = block_lanes(VEC_, BLOCK)
    if MASKED:
        # The tail: fewer than BLOCK elements remain, an int32 count.
        mask = block_mask(lanes, (n_elements - start).to(tl.int32), MASKED, BLOCK)
    else:
        mask = block_mask(lanes, n_elements, MASKED, BLOCK)
    x = tl.load(logits_ptr + start + lanes, mask=mask, other=0).to(CT)
    if CLASS_INDEX:
        z = class_index_label(labels_ptr, start + lanes, mask, row, col, d2, n_cols, s, NDIM, VEC_WRAPS, MASKED,
                              VEC_)
    else:
        z = tl.load(labels_ptr + start + lanes, mask=mask, other=0).to(CT)
        z = z * (1.0 - s) + 0.5 * s
    w = load_coefficient(weight_ptr, w_scalar, start + lanes, mask, row, col, d1, d2, d3,
                         stride_w_0, stride_w_1, stride_w_2, stride_w_3, W_LAYOUT, NDIM, VEC_WRAPS, MASKED, CT,
                         VEC_)
    p = load_coefficient(pos_weight_ptr, pw_scalar, start + lanes, mask, row, col, d1, d2, d3,
                         stride_pw_0, stride_pw_1, stride_pw_2, stride_pw_3, PW_LAYOUT, NDIM, VEC_WRAPS, MASKED, CT,
                         VEC_)
    return lanes, mask, x, z, w, p


@triton.jit
def class_index_label(labels_ptr, offs, mask, row, col, d2, n_cols, s, NDIM: tl.constexpr,
                      VEC_WRAPS: tl.constexpr, MASKED: tl.constexpr, VEC_: tl.constexpr):
    """The smoothed one-hot label z' at flat offsets offs of (rows, n_cols)
    logits from one int64 class index per row (-1 and n_cols: padding and
    background, no positive): 1 - s / 2 where the column is the row's
    index, s / 2 elsewhere, never a one-hot tensor. An index outside
    [-1, n_cols] gives NaN for the whole row (no host sync to raise).

    The index is a coefficient constant along the classes, read as
    `load_coefficient` reads one: the launchers collapse with the classes
    apart (`layout.collapse`), so NDIM == 2 means (rows d2, classes
    n_cols), each vector's (row, class) stepped. Vectors within a row: one
    index per vector, and per element one compare of the lane with the
    index's place in the vector (no add, no division, no gather). Vectors
    crossing row ends: per element, carried past them. Any other collapse
    (rows interleaved with a weight's dimensions): the row by division."""
    if NDIM == 2 and VEC_WRAPS == 0:
        # (Vectors of the tail block past the last row read the last row, then masked.)
        if MASKED:
            row = tl.minimum(row, d2 - 1)
        index = tl.load(labels_ptr + row)[:, None]
        # int32 after the int64 check below: a valid index is within a row of the column.
        hot = tl.arange(0, VEC_)[None, :] == (index - col[:, None]).to(tl.int32)
    else:
        if NDIM == 2:
            row_j, col_j = element_rows_classes(row, col, n_cols, VEC_WRAPS, VEC_)
        else:
            row_j = offs // n_cols
            col_j = offs - row_j * n_cols
        index = tl.load(labels_ptr + row_j, mask=mask, other=0)
        hot = col_j == index.to(tl.int32)
    # Checked in int64: an index past int32 is still out of range.
    bad = (index < -1) | (index > n_cols)
    # The smoothing as the other labels take it, z (1 - s) + s / 2, per index, not per element.
    on = tl.where(bad, float("nan"), 1.0 * (1.0 - s) + 0.5 * s)
    off = tl.where(bad, float("nan"), 0.0 * (1.0 - s) + 0.5 * s)
    return tl.where(hot, on, off)


@triton.jit
def focal_hard_labels(x, z, e, r, log_term, ce, gamma, alpha, HAS_ALPHA: tl.constexpr, FAST_MATH: tl.constexpr):
    """(L, dL/dx) of the focal loss for labels z' in {0, 1}, in closed form.

    With u = x (z' = 1) or -x (z' = 0), the margin: p_t = sigmoid(u),
    1 - p_t = sigmoid(-u), ce = softplus(-u), and with k = alpha_t sigmoid(-u)^gamma,
      L = k ce,  dL/dx = (1 - 2 z') k (gamma sigmoid(u) ce + sigmoid(-u)).
    u >= 0 ("agree") exactly where y (`focal_soft_labels`) is 1: sigmoid(u) = r and
    sigmoid(-u) = e r there, swapped elsewhere; log sigmoid(-u) = -|x| or 0,
    minus log1p(e). One exp beyond the cross entropy's terms, whose dl/dx
    this replaces."""
    y = tl.where(x >= 0, z, 1.0 - z)
    agree = y != 0
    er = e * r
    sig_u = tl.where(agree, r, er)
    sig_neg_u = tl.where(agree, er, r)
    # gamma = 0: 0 * log(0) = 0 (x = +-inf), so sigmoid(-u)^0 = 1.
    factor = exp_any(mul0(gamma, tl.where(agree, -tl.abs(x), 0.0) - log_term), FAST_MATH)
    if HAS_ALPHA:
        k = ((1.0 - alpha) + (2.0 * alpha - 1.0) * z) * factor
    else:
        k = factor
    # Masked products: alpha_t = 0 or sigmoid(u) = 0 against ce = inf (x = +-inf, label disagreeing).
    loss = mul0(k, ce)
    d_logits = (1.0 - 2.0 * z) * k * (gamma * mul0(sig_u, ce) + sig_neg_u)
    return loss, d_logits


@triton.jit
def weighted_loss_and_grads(x, z, w, p, gamma, alpha, HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr,
                            FOCAL: tl.constexpr, HAS_ALPHA: tl.constexpr, HARD_LABELS: tl.constexpr,
                            CT: tl.constexpr, FAST_MATH: tl.constexpr):
    """`loss_and_grads` (FOCAL: times alpha_t (1 - p_t)^gamma)
    times the weight; a zero weight masks all three.

    focal: L = alpha_t F l, alpha_t = (1 - alpha) + (2 alpha - 1) z' (1 without HAS_ALPHA),
    dL/dx = alpha_t (F dl/dx + l dF/dx), dL/dz' = alpha_t (F dl/dz' + l dF/dz') + (2 alpha - 1) F l,
    each product masked (0 * inf = 0: an infinite l where F's derivative is 0)."""
    loss, d_logits, d_labels, e, r, log_term = ce_terms(x, z, p, HAS_POS_WEIGHT, CT, FAST_MATH)
    if FOCAL and HARD_LABELS and not HAS_POS_WEIGHT:
        loss, d_logits = focal_hard_labels(x, z, e, r, log_term, loss, gamma, alpha, HAS_ALPHA, FAST_MATH)
        d_labels = tl.zeros_like(loss)  # hard labels take no gradient
    elif FOCAL:
        loss, d_logits, d_labels = focal_soft_labels(x, z, e, r, log_term, loss, d_logits, d_labels, gamma, alpha,
                                                      HAS_ALPHA, HARD_LABELS, FAST_MATH)
    if HAS_WEIGHT:
        loss = mul0(w, loss)
        d_logits = mul0(w, d_logits)
        d_labels = mul0(w, d_labels)
    return loss, d_logits, d_labels


@triton.jit
def total_of(acc):
    """The sum of a [rows, vector] block of running sums, in a fixed order."""
    return tl.sum(tl.sum(acc, axis=1), axis=0)


@triton.jit
def divide(numerator, denom, REDUCTION: tl.constexpr):
    """numerator / denom as the reduction divides: TF's "no NaN" (a zero
    denominator gives 0), or plainly for PyTorch's mean. Correctly rounded
    (as torch's sum / numel) and once per launch: float32 by div.rn, not the
    approximate `/`, which the compiler would share with any other `/` by the
    same denominator, keeping its scaling predicate live across the loop."""
    if numerator.dtype == tl.float64:
        quotient = numerator / denom
    else:
        quotient = tl.math.div_rn(numerator, denom)
    if REDUCTION == TORCH_MEAN:
        res = quotient
    else:
        res = tl.where(denom == 0, 0.0, quotient)
    return res
