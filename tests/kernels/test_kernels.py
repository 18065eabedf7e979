"""The Triton kernels (interpreted here, compiled on a GPU): numbers against the
reference and float64 math at ragged sizes, launch counts, every output
element written, determinism, and the host-side layout."""

import pytest
import torch

import fused_sigxent as fs
from conftest import HAS_GPU, assert_close, oracle_elementwise, oracle_reduce
from fused_sigxent.op import routes
from fused_sigxent.core import reduction as R
from fused_sigxent.core import layout
from fused_sigxent.kernels import _launch, _grid

# 1: a single element; 17: under one block; 1000, 4099: ragged tails past
# several blocks and more blocks than programs (grid-stride loop); (3, 1031):
# an odd prime width; (1, 1025): one row, a width just past a power of two;
# (129, 1): a width of 1 (CTR: one logit per sample); (2, 5, 77): rank 3 with
# a broadcast middle dimension.
SHAPES = [(1,), (17,), (1000,), (4099,), (3, 1031), (1, 1025), (129, 1), (2, 5, 77)]
LOGITS_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
REDUCTIONS = {R.NONE: "none", R.SUM: "sum", R.MEAN_BY_WEIGHTS: "mean", R.MEAN_BY_NUMEL: "numel",
              R.MEAN_BY_NONZERO: "nonzero", R.TORCH_MEAN: "torch_mean"}


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "triton")


def weights_for(shape, kind):
    if kind is None:
        return None
    if kind == "scalar":
        return torch.tensor(0.75)
    if kind == "class":
        return torch.rand(shape[-1]) + 0.1
    if kind == "middle":  # broadcast on every dimension but one inner one
        return torch.rand((1,) * (len(shape) - 1) + shape[-1:]) if len(shape) < 3 else torch.rand(1, shape[1], 1)
    w = torch.rand(shape)
    w[w < 0.2] = 0  # full weights with zeros: nonzero count != numel
    return w


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", LOGITS_DTYPES)
def test_every_reduction_and_coefficient_against_float64(poisoned, shape, dtype):
    for reduction, name in REDUCTIONS.items():
        for w_kind, p_kind, s in [(None, None, 0.0), ("class", "class", 0.1), ("full", None, 0.3),
                                  ("scalar", "middle", 0.0), ("middle", "full", 0.2)]:
            x = (torch.randn(shape) * 5).to(dtype).requires_grad_()
            z = torch.rand(shape).to(dtype).requires_grad_()
            w, p = weights_for(shape, w_kind), weights_for(shape, p_kind)
            where = f"{name}, weight {w_kind}, pos_weight {p_kind}, smoothing {s}"
            loss = routes.sigmoid_ce(x, z, w, p, s, reduction, dtype)
            xd, zd = x.double().detach().requires_grad_(), z.double().detach().requires_grad_()
            expected = oracle_reduce(oracle_elementwise(xd, zd, p, s), w, name)
            assert_close(loss, expected, dtype, msg=where)
            grad = torch.randn(loss.shape, dtype=torch.float64)
            got = torch.autograd.grad(loss, (x, z), grad.to(dtype))
            for g, e in zip(got, torch.autograd.grad(expected, (xd, zd), grad)):
                assert_close(g, e, dtype, msg=where)


@pytest.mark.parametrize("label_dtype", [torch.bool, torch.uint8, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_label_dtypes_against_reference(poisoned, label_dtype, dtype, monkeypatch):
    x = torch.randn(3, 1031).to(dtype)
    z = (torch.rand(3, 1031) > 0.5).to(label_dtype)
    for reduction in ["none", "mean"]:
        got = fs.binary_cross_entropy_with_logits(x, z, reduction=reduction, label_smoothing=0.1)
        monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "reference")
        want = fs.binary_cross_entropy_with_logits(x, z, reduction=reduction, label_smoothing=0.1)
        monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "triton")
        assert_close(got, want, dtype)


def test_one_launch_forward_one_launch_backward(launches):
    x = torch.randn(3, 1031, requires_grad=True)
    z = torch.rand(3, 1031, requires_grad=True)
    cases = {
        # reduced, static denominator: the forward writes both gradients; the
        # backward only scales them (and returns at once for a gradient of 1).
        "mean": lambda: fs.binary_cross_entropy_with_logits(x, z, torch.rand(1031), pos_weight=torch.rand(1031)),
        # data-dependent denominator: the backward recomputes both in one launch.
        "tf mean, full weights": lambda: fs.sigmoid_cross_entropy(z, x, torch.rand(3, 1031), 0.1, fs.Reduction.MEAN),
        # elementwise: the incoming gradient is a full tensor.
        "none": lambda: fs.binary_cross_entropy_with_logits(x, z, reduction="none"),
    }
    for name, loss_fn in cases.items():
        launches.clear()
        loss = loss_fn()
        assert sum(launches.values()) == 1, (name, launches)
        assert launches == {"_sigmoid_ce_fwd_kernel": 1}
        launches.clear()
        loss.backward(torch.randn(loss.shape))
        assert sum(launches.values()) == 1, (name, launches)


def test_gradient_of_one_skips_the_scaling(poisoned):
    x = torch.randn(2, 77, requires_grad=True)
    z = torch.rand(2, 77)
    loss = fs.binary_cross_entropy_with_logits(x, z, reduction="sum")
    loss.backward()
    assert_close(x.grad, torch.sigmoid(x.detach()) - z)
    x.grad = None
    fs.binary_cross_entropy_with_logits(x, z, reduction="sum").backward(torch.tensor(-2.5))
    assert_close(x.grad, (torch.sigmoid(x.detach()) - z) * -2.5)


def test_bitwise_deterministic():
    x = torch.randn(4099, requires_grad=True)
    z = torch.rand(4099)
    w = torch.rand(4099)
    runs = []
    for _ in range(3):
        x.grad = None
        loss = fs.sigmoid_cross_entropy(z, x, w, 0.1, fs.Reduction.MEAN)
        loss.backward(torch.tensor(0.3))
        runs.append((loss.detach().clone(), x.grad.clone()))
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])


def test_empty_and_zero_dim_inputs(poisoned):
    for shape in [(), (0,), (0, 7), (5, 0, 3)]:
        x = torch.randn(shape, requires_grad=True)
        z = torch.rand(shape)
        for reduction in ["none", "sum", "mean"]:
            got = fs.binary_cross_entropy_with_logits(x, z, reduction=reduction)
            want = torch.nn.functional.binary_cross_entropy_with_logits(x, z, reduction=reduction)
            assert_close(got, want)
            if x.numel():
                assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


def test_rank_five_interleaved_broadcast():
    # (2, C, 3, D, 2) logits with a (1, C, 1, D, 1) weight leave five collapsed
    # dimensions: the documented case where the weight is made contiguous.
    shape = (2, 3, 3, 4, 2)
    x, z = torch.randn(shape), torch.rand(shape)
    w = torch.rand(1, 3, 1, 4, 1)
    got = fs.binary_cross_entropy_with_logits(x, z, w, "sum")
    assert_close(got, oracle_reduce(oracle_elementwise(x, z), w, "sum").float())


def test_collapse_reads_broadcast_coefficients_through_strides():
    class_vector = torch.rand(1, 128)
    sizes, (w, _), (sw, _) = layout.collapse(torch.Size([64, 128]), [class_vector, None])
    assert sizes == [1, 1, 64, 128] and sw == [0, 0, 0, 1] and w is class_vector
    per_sample = torch.rand(64, 1)
    sizes, _, (sw,) = layout.collapse(torch.Size([64, 1]), [per_sample])
    assert sizes == [1, 1, 1, 64] and sw == [0, 0, 0, 1]
    scalar = torch.tensor(2.0)
    sizes, _, (sw,) = layout.collapse(torch.Size([5, 6, 7]), [scalar])
    assert layout.ndim(sizes) == 1 and sw == [0, 0, 0, 0]
    middle = torch.rand(1, 6, 1)
    sizes, _, (sw,) = layout.collapse(torch.Size([5, 6, 7]), [middle])
    assert sizes == [1, 5, 6, 7] and sw == [0, 0, 1, 0]


def test_collapse_materializes_nothing_at_rank_four(monkeypatch):
    # No coefficient over a rank-4 shape may be expanded to full size.
    calls = []
    contiguous = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda t, *a, **k: calls.append(t.shape) or contiguous(t, *a, **k))
    for w_shape in [(1, 5, 1, 7), (4, 1, 6, 1), (5, 1, 1), ()]:
        layout.collapse(torch.Size([4, 5, 6, 7]), [torch.rand(w_shape), torch.rand(7)])
    assert calls == []


@pytest.mark.skipif(HAS_GPU, reason="the interpreter-only path")
def test_interpreter_runs_a_fixed_config():
    # The autotuner cannot time under the interpreter: a heuristics wrapper
    # fixes BLOCK instead.
    import triton

    from fused_sigxent.kernels.sigmoid_ce_fwd import _sigmoid_ce_fwd_kernel

    assert isinstance(_sigmoid_ce_fwd_kernel, triton.runtime.Heuristics)


def test_int64_offsets_compute_the_same(monkeypatch):
    # The int64 path (numel near 2**31, too large for the interpreter) forced
    # on a small ragged problem: same numbers as the int32 path.
    x = torch.randn(3, 1031, requires_grad=True)
    z, w = torch.rand(3, 1031), torch.rand(1031)
    results = []
    for limit in [_grid.INT32_LIMIT, 0]:
        monkeypatch.setattr(_grid, "INT32_LIMIT", limit)
        _launch.PLANS.clear()  # plans made with the other limit would be replayed
        for reduction in ["none", "mean"]:
            x.grad = None
            loss = fs.binary_cross_entropy_with_logits(x, z, w, reduction, w, label_smoothing=0.1)
            loss.backward(torch.ones_like(loss) * 0.5)
            results.append((loss.detach(), x.grad.clone()))
        assert {launch.constexprs["INT64"] for _, launch in _launch.launches()} == {limit == 0}
    for (a, ga), (b, gb) in zip(results[:2], results[2:]):
        assert torch.equal(a, b) and torch.equal(ga, gb)


def test_leaf_gradient_is_the_buffer_the_forward_wrote():
    # The gradient written in the forward reaches x.grad without a copy:
    # autograd takes the tensor the backward returned.
    x = torch.randn(3, 40, requires_grad=True)
    seen = []
    x.register_hook(lambda g: seen.append(g.data_ptr()))
    fs.binary_cross_entropy_with_logits(x, torch.rand(3, 40)).backward()
    assert seen == [x.grad.data_ptr()]
