"""Device functions shared by the sigmoid cross entropy kernels: loads through
broadcast strides, and the stable loss and gradient formulas of
`fused_sigxent/_reference.py`, term for term."""

import triton
import triton.language as tl

# The op's reduction codes (fused_sigxent/_reduction.py); constexpr copies for the kernels.
NONE = tl.constexpr(0)
SUM = tl.constexpr(1)
MEAN_BY_WEIGHTS = tl.constexpr(2)
MEAN_BY_NUMEL = tl.constexpr(3)
MEAN_BY_NONZERO = tl.constexpr(4)
TORCH_MEAN = tl.constexpr(5)


@triton.jit
def mul0(a, b):
    """a * b with 0 * anything = 0 (a zero weight masks an infinite loss)."""
    return tl.where(a == 0, 0.0, a * b)


@triton.jit
def log1p_small(e):
    """log(1 + e) for e in [0, 1], accurate where 1 + e rounds (Goldberg's trick:
    the rounding error of u = 1 + e cancels in log(u) / (u - 1))."""
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))


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
def load_coefficient(ptr, offs, mask, d1, d2, d3, s0, s1, s2, s3, NDIM: tl.constexpr, CT: tl.constexpr):
    """A broadcast coefficient at `offs`, upcast to the compute dtype (0 where masked)."""
    return tl.load(ptr + coefficient_offsets(offs, d1, d2, d3, s0, s1, s2, s3, NDIM), mask=mask, other=0).to(CT)


@triton.jit
def smoothing(smoothing_ptr, CT: tl.constexpr):
    """The label smoothing s, read from a 0-d tensor of the compute dtype: it
    travels as data, so a new value is neither a new kernel specialization
    nor (under torch.compile) a recompile."""
    return tl.load(smoothing_ptr).to(CT)


@triton.jit
def loss_and_grads(x, z, p, HAS_POS_WEIGHT: tl.constexpr):
    """Elementwise loss l, dl/dx and dl/dz' (z' the smoothed label, p pos_weight).

    stable loss: l = (1 - z') relu(x) + p z' relu(-x) + q log1p(exp(-|x|)), q = 1 + (p - 1) z'
    (p = 1: max(x, 0) - x z' + log1p(exp(-|x|)))
    dl/dx  = (1 - z') sigmoid(x) - p z' sigmoid(-x)
    dl/dz' = -relu(x) + p relu(-x) + (p - 1) log1p(exp(-|x|))
    """
    # One exp serves both sigmoids and the log term: e = exp(-|x|) never overflows.
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    pos = x >= 0
    sig_x = tl.where(pos, r, e * r)
    sig_neg_x = tl.where(pos, e * r, r)
    log_term = log1p_small(e)
    relu_x = tl.where(pos, x, 0.0)
    relu_neg_x = tl.where(pos, 0.0, -x)
    if HAS_POS_WEIGHT:
        pz = p * z
        loss = mul0(1.0 - z, relu_x) + mul0(pz, relu_neg_x) + (1.0 + (p - 1.0) * z) * log_term
        d_logits = (1.0 - z) * sig_x - pz * sig_neg_x
        d_labels = mul0(p, relu_neg_x) - relu_x + (p - 1.0) * log_term
    else:
        loss = mul0(1.0 - z, relu_x) + mul0(z, relu_neg_x) + log_term
        d_logits = (1.0 - z) * sig_x - z * sig_neg_x
        d_labels = relu_neg_x - relu_x
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
        mask = tl.full([BLOCK], 1, tl.int1)
    return mask


@triton.jit
def load_block(
    start, logits_ptr, labels_ptr, weight_ptr, pos_weight_ptr, n_elements, d1, d2, d3,
    stride_w_0, stride_w_1, stride_w_2, stride_w_3, stride_pw_0, stride_pw_1, stride_pw_2, stride_pw_3,
    s,
    HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr, NDIM: tl.constexpr,
    MASKED: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr,
):
    """Offsets, mask and inputs of the block at `start`, upcast to the compute
    dtype: x, the smoothed label z' = z (1 - s) + 0.5 s, the weight w and
    pos_weight p (1.0 when absent; 0 where masked)."""
    offs = start + tl.arange(0, BLOCK)
    mask = block_mask(offs, n_elements, MASKED, BLOCK)
    x = tl.load(logits_ptr + offs, mask=mask, other=0).to(CT)
    z = tl.load(labels_ptr + offs, mask=mask, other=0).to(CT)
    z = z * (1.0 - s) + 0.5 * s
    w = 1.0
    if HAS_WEIGHT:
        w = load_coefficient(weight_ptr, offs, mask, d1, d2, d3, stride_w_0, stride_w_1, stride_w_2, stride_w_3,
                             NDIM, CT)
    p = 1.0
    if HAS_POS_WEIGHT:
        p = load_coefficient(pos_weight_ptr, offs, mask, d1, d2, d3,
                             stride_pw_0, stride_pw_1, stride_pw_2, stride_pw_3, NDIM, CT)
    return offs, mask, x, z, w, p


@triton.jit
def weighted_loss_and_grads(x, z, w, p, HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr):
    """`loss_and_grads` times the weight; a zero weight masks all three."""
    loss, d_logits, d_labels = loss_and_grads(x, z, p, HAS_POS_WEIGHT)
    if HAS_WEIGHT:
        loss = mul0(w, loss)
        d_logits = mul0(w, d_logits)
        d_labels = mul0(w, d_labels)
    return loss, d_logits, d_labels


@triton.jit
def divide(numerator, denom, REDUCTION: tl.constexpr):
    """numerator / denom as the reduction divides: TF's "no NaN" (a zero
    denominator gives 0), or plainly for PyTorch's mean."""
    if REDUCTION == TORCH_MEAN:
        res = numerator / denom
    else:
        res = tl.where(denom == 0, 0.0, numerator / denom)
    return res
