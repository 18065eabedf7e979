"""Sigmoid focal loss (`fused_sigxent/frontends/focal.py`): against a
float64 re-implementation of torchvision's formula, on both backends
(kernels interpreted), with its stability, masking, class-index targets,
launch counts, argument checks and derivatives off the beaten path."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES, assert_close, second_derivatives, torchvision_focal

import fused_sigxent as fs
from fused_sigxent.impl import cpu as _cpu
from fused_sigxent import impl
from fused_sigxent.impl import reference as _reference
from fused_sigxent.core import reduction as R

GAMMAS = [0.0, 0.5, 1.0, 2.0, 5.0]
ALPHAS = [-1.0, 0.25, 0.75]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# 3 rows of 13 classes: a prime width (no chunk of 8 divides it, so the
# kernels' ragged paths run) in a size the interpreter takes quickly.
SHAPE = (3, 13)


def one_hot(index, n_classes):
    """Dense labels of class indices (n_classes: background), for the oracle only."""
    return F.one_hot(index, n_classes + 1)[..., :n_classes].double()


def _targets(kind, shape):
    if kind == "soft":
        return torch.rand(shape)
    if kind == "index":
        return torch.randint(0, shape[-1] + 1, shape[:-1])
    return (torch.rand(shape) > 0.5).to({"bool": torch.bool, "uint8": torch.uint8}[kind])


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_matches_torchvision_every_reduction(backend, gamma, alpha):
    x = (torch.randn(SHAPE) * 3).requires_grad_()
    z = torch.rand(SHAPE)
    for reduction in ["none", "mean", "sum"]:
        loss = fs.sigmoid_focal_loss(x, z, alpha, gamma, reduction)
        xd = x.detach().double().requires_grad_()
        want = torchvision_focal(xd, z, alpha, gamma, reduction)
        assert loss.dtype == torch.float32 and loss.shape == want.shape
        assert_close(loss, want, torch.float32)
        grad = torch.randn(loss.shape)
        (gx,) = torch.autograd.grad(loss, x, grad)
        (want_gx,) = torch.autograd.grad(want, xd, grad.double())
        assert_close(gx, want_gx, torch.float32, msg=f"{reduction}")


@pytest.mark.parametrize("kind", ["soft", "bool", "uint8", "index"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_targets_weights_smoothing(backend, dtype, kind):
    # Per-class weights (broadcast, read through strides) and smoothing, on
    # each logits dtype and target kind; reduced (gradient written in the
    # forward) and elementwise (recomputed in the backward).
    x = (torch.randn(SHAPE) * 3).to(dtype).requires_grad_()
    z = _targets(kind, SHAPE)
    dense = one_hot(z, SHAPE[-1]) if kind == "index" else z.double()
    weight = torch.rand(SHAPE[-1]).to(dtype)
    for reduction, smoothing in [("mean", 0.0), ("none", 0.1), ("sum", 0.1)]:
        loss = fs.sigmoid_focal_loss(x, z, 0.25, 2.0, reduction, weight=weight, label_smoothing=smoothing)
        xd = x.detach().double().requires_grad_()
        want = torchvision_focal(xd, dense, 0.25, 2.0, reduction, weight, smoothing)
        assert loss.dtype == dtype
        assert_close(loss, want, dtype, msg=f"{reduction}")
        grad = torch.randn(loss.shape).to(dtype)
        (gx,) = torch.autograd.grad(loss, x, grad)
        (want_gx,) = torch.autograd.grad(want, xd, grad.double())
        assert_close(gx, want_gx, dtype, msg=f"{reduction} grad")


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradients_for_soft_targets_and_weight(backend, reduction):
    x = (torch.randn(SHAPE) * 2).requires_grad_()
    z = torch.rand(SHAPE, requires_grad=True)
    w = torch.rand(SHAPE[-1], requires_grad=True)
    for gamma, alpha in [(0.5, 0.25), (2.0, -1.0)]:
        loss = fs.sigmoid_focal_loss(x, z, alpha, gamma, reduction, weight=w, label_smoothing=0.1)
        leaves = [t.detach().double().requires_grad_() for t in (x, z, w)]
        want = torchvision_focal(*leaves[:2], alpha, gamma, reduction, leaves[2], 0.1)
        grad = torch.randn(loss.shape)
        got = torch.autograd.grad(loss, (x, z, w), grad)
        expected = torch.autograd.grad(want, leaves, grad.double())
        for name, g, e in zip(("inputs", "targets", "weight"), got, expected):
            assert_close(g, e, torch.float32, msg=f"{gamma} {alpha} {name}")


def test_gamma_zero_without_alpha_is_the_cross_entropy_exactly(backend):
    x = (torch.randn(SHAPE) * 3).requires_grad_()
    z = torch.rand(SHAPE)
    for reduction in ["none", "mean"]:
        focal = fs.sigmoid_focal_loss(x, z, -1.0, 0.0, reduction)
        bce = fs.binary_cross_entropy_with_logits(x, z, reduction=reduction)
        assert torch.equal(focal, bce)
    # The focal variant of the op itself (gamma = 0 as data): the same numbers.
    s, g0 = torch.zeros(()), torch.zeros(())
    for reduction in [R.NONE, R.TORCH_MEAN]:
        focal = torch.ops.fused_sigxent.sigmoid_ce_fwd(x, z, None, None, s, reduction, torch.float32, False, False,
                                                         g0, None, False)
        bce = torch.ops.fused_sigxent.sigmoid_ce_fwd(x, z, None, None, s, reduction, torch.float32, False, False)
        assert torch.equal(focal[0], bce[0])
    one = torch.ones(())
    gf = torch.ops.fused_sigxent.sigmoid_ce_bwd(one, x, z, None, None, torch.ones(()), s, R.SUM, True, False,
                                                g0, None, False)
    gb = torch.ops.fused_sigxent.sigmoid_ce_bwd(one, x, z, None, None, torch.ones(()), s, R.SUM, True, False)
    assert torch.equal(gf[0], gb[0])


MAGNITUDES = [0.0, 1e-8, 30.0, 100.0, 1e4]


@pytest.mark.parametrize("dtype", DTYPES)
def test_stable_for_every_gamma_at_extreme_logits(backend, dtype):
    # Every |x| and sign against hard labels 0 and 1 and a soft 0.3, in one
    # tensor per gamma: finite loss and gradient, and the float64 values.
    # (At |x| = 1e4 float16 holds inf: its row checks the limits below.)
    mags = torch.tensor(MAGNITUDES, dtype=torch.float64)
    x = torch.cat([mags, -mags]).repeat_interleave(3).to(dtype)
    z = torch.tensor([0.0, 1.0, 0.3]).repeat(2 * len(MAGNITUDES))
    finite = x.isfinite()
    for gamma in GAMMAS:
        xg = x.clone().requires_grad_()
        loss = fs.sigmoid_focal_loss(xg, z, 0.25, gamma, "none")
        (gx,) = torch.autograd.grad(loss.sum(), xg)
        assert loss[finite].isfinite().all() and gx.isfinite().all(), (gamma, loss, gx)
        want = _log_space_oracle(x.double(), z.double(), 0.25, gamma)
        assert_close(loss[finite], want[finite], dtype, msg=f"gamma {gamma}")


def _log_space_oracle(x, z, alpha, gamma):
    """The focal loss in float64 by logaddexp: exact where torchvision's
    1 - p_t rounds to 0 (|x| past 37 in float64)."""
    log_m = torch.logaddexp(torch.log1p(-z) + F.logsigmoid(x), torch.log(z) + F.logsigmoid(-x))
    ce = z * torch.logaddexp(torch.zeros_like(x), -x) + (1 - z) * torch.logaddexp(torch.zeros_like(x), x)
    return (alpha * z + (1 - alpha) * (1 - z)) * ce * torch.exp(gamma * log_m)


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinite_logits_give_the_limits(backend, dtype):
    x = torch.tensor([math.inf, math.inf, -math.inf, -math.inf], dtype=dtype, requires_grad=True)
    z = torch.tensor([1.0, 0.0, 0.0, 1.0])
    for gamma in GAMMAS:
        loss = fs.sigmoid_focal_loss(x, z, 0.25, gamma, "none")
        (gx,) = torch.autograd.grad(loss.sum(), x)
        # Agreeing labels: 0; disagreeing: inf (as the cross entropy's limit).
        assert loss.tolist() == [0.0, math.inf, 0.0, math.inf], (gamma, loss)
        assert gx.isfinite().all(), (gamma, gx)


def test_kornia_918_confident_logits_below_gamma_one(backend):
    # kornia #918: gamma in (0, 1), x = +-100, hard labels; torchvision's
    # formula gives NaN gradients there (pow's derivative inf times 0).
    x = torch.tensor([100.0, -100.0, 100.0, -100.0], requires_grad=True)
    z = torch.tensor([1, 0, 0, 1], dtype=torch.uint8)
    xt = x.detach().clone().requires_grad_()
    torchvision_loss = _torchvision_float32(xt, z.float(), 0.25, 0.5)
    torchvision_loss.sum().backward()
    assert xt.grad.isnan().any()
    loss = fs.sigmoid_focal_loss(x, z, 0.25, 0.5, "sum")
    loss.backward()
    assert loss.isfinite() and x.grad.isfinite().all(), x.grad
    assert_close(x.grad, torch.tensor([0.0, 0.0, 0.75, -0.25]), torch.float32)


def _torchvision_float32(x, z, alpha, gamma):
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, z, reduction="none")
    p_t = p * z + (1 - p) * (1 - z)
    return (alpha * z + (1 - alpha) * (1 - z)) * ce * (1 - p_t) ** gamma


def test_nan_in_nan_out_and_zero_weight_masks(backend):
    x = torch.tensor([[0.5, math.nan, math.inf, -2.0]], requires_grad=True)
    z = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    w = torch.tensor([1.0, 1.0, 0.0, 0.0])
    for gamma in [0.5, 2.0]:
        loss = fs.sigmoid_focal_loss(x, z, 0.25, gamma, "none", weight=w)
        (gx,) = torch.autograd.grad(loss.sum(), x)
        assert loss[0, 1].isnan() and gx[0, 1].isnan()
        assert loss[0, 0].isfinite() and gx[0, 0].isfinite()
        # a zero weight masks even an infinite loss, to exactly 0
        assert loss[0, 2:].tolist() == [0.0, 0.0] and gx[0, 2:].tolist() == [0.0, 0.0]


def test_class_index_out_of_range_raises_on_cpu():
    x = torch.randn(2, 5)
    for bad in ([0, 6], [-2, 2]):
        with pytest.raises(ValueError, match=r"\[-1, 5\]"):
            fs.sigmoid_focal_loss(x, torch.tensor(bad), reduction="sum")


def test_minus_one_and_c_both_mean_no_positive(backend):
    # -1 (padding, as the linear head's lists) and C (background, mmdet's
    # convention) are the same all-negative row, on every backend.
    x = torch.randn(4, 5, requires_grad=True)
    got = fs.sigmoid_focal_loss(x, torch.tensor([-1, 2, 5, -1]), reduction="none")
    want = fs.sigmoid_focal_loss(x, torch.tensor([5, 2, 5, 5]), reduction="none")
    assert_close(got, want)
    dense = torch.zeros(4, 5)
    dense[1, 2] = 1
    assert_close(got, fs.sigmoid_focal_loss(x, dense, reduction="none"))
    gx, = torch.autograd.grad(got.sum(), x)
    assert_close(gx, torch.autograd.grad(fs.sigmoid_focal_loss(x, dense, reduction="sum"), x)[0])


def test_alpha_and_gamma_as_tensors_are_data(backend):
    # torchvision accepts 0-d tensors; a schedule passes a new one each step,
    # which must give the numbers' result and never a kept plan's old value.
    x = torch.randn(3, 6, requires_grad=True)
    z = (torch.rand(3, 6) > 0.5).float()
    for gamma, alpha in [(2.0, 0.25), (0.5, 0.75), (1.5, 0.0)]:
        for _ in range(2):
            got = fs.sigmoid_focal_loss(x, z, torch.tensor(alpha), torch.tensor(gamma), "mean")
            want = fs.sigmoid_focal_loss(x, z, alpha, gamma, "mean")
            assert_close(got, want)
            assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])
    module = fs.SigmoidFocalLoss(torch.tensor(0.25), torch.tensor(2.0))
    assert_close(module(x, z), fs.sigmoid_focal_loss(x, z, 0.25, 2.0, "mean"))
    for alpha, gamma, words in [(0.25, -1.0, "gamma"), (0.25, float("inf"), "gamma"), (1.5, 2.0, "alpha"),
                                (-1.0, 2.0, "alpha")]:
        with pytest.raises(ValueError, match=words):
            fs.sigmoid_focal_loss(x, z, torch.tensor(alpha), torch.tensor(gamma))
    with pytest.raises(ValueError, match="detach"):
        fs.sigmoid_focal_loss(x, z, 0.25, torch.tensor(2.0, requires_grad=True))
    with pytest.raises(TypeError, match="0-d"):
        fs.sigmoid_focal_loss(x, z, 0.25, torch.tensor([2.0]))


def test_a_gamma_schedule_does_not_recompile():
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    x, z = torch.randn(3, 6), (torch.rand(3, 6) > 0.5).float()
    loss = torch.compile(lambda x, z, g: fs.sigmoid_focal_loss(x, z, 0.25, g, "sum"), backend=counting)
    for gamma in (2.0, 1.0, 0.5):
        assert_close(loss(x, z, torch.tensor(gamma)), fs.sigmoid_focal_loss(x, z, 0.25, gamma, "sum"))
    assert len(compiles) == 1


def test_a_bad_reduction_says_invalid_as_torchvision_does():
    # torchvision's own tests match the reduction error on the word "Invalid".
    with pytest.raises(ValueError, match="Invalid") as error:
        fs.sigmoid_focal_loss(torch.randn(2, 3), torch.rand(2, 3), reduction="average")
    assert "'none', 'mean', 'sum'" in str(error.value)
    with pytest.raises(ValueError, match="Invalid"):
        fs.SigmoidFocalLoss(reduction="average")


def test_class_index_out_of_range_poisons_its_row(backend):
    # What a GPU does (no sync to raise): NaN in that row's loss, never a number.
    x = torch.randn(3, 5)
    index = torch.tensor([0, 7, 5])
    s, gamma = torch.zeros(()), torch.full((), 2.0)
    loss, *_ = torch.ops.fused_sigxent.sigmoid_ce_fwd(x, index, None, None, s, R.NONE, torch.float32, False, False,
                                                     gamma, None, True)
    assert loss[1].isnan().all() and loss[[0, 2]].isfinite().all()
    total, *_ = torch.ops.fused_sigxent.sigmoid_ce_fwd(x, index, None, None, s, R.SUM, torch.float32, False, False,
                                                      gamma, None, True)
    assert total.isnan()


# (rows, classes) of class-index targets, as tests/kernels/test_math.py's layouts:
# 40 classes (chunks of 8 within a row: one index per chunk), 37 and 5 (chunks
# crossing one and two row ends), 1 class, one row; enough rows for the
# interpreter's 4 programs to step along the grid stride, with a ragged tail.
# (6, 7, 33) with a (1, 7, 1) weight keeps three dimensions: rows by division.
CLASS_INDEX_LAYOUTS = [((129, 40), "class"), ((150, 37), None), ((301, 5), "full"), ((640, 1), None),
                       ((1, 13), None), ((6, 7, 33), "middle")]


@pytest.mark.parametrize("shape, weight_kind", CLASS_INDEX_LAYOUTS)
def test_class_index_targets_in_every_layout(monkeypatch, shape, weight_kind):
    # The kernels step each chunk's (row, class) for class indices (the
    # classes kept apart when collapsing), and the label they read is the
    # one-hot one, bit for bit: against the same kernels on dense uint8
    # one-hot labels, and against float64; an out-of-range index poisons
    # its row, and only its row, wherever that row falls.
    from fused_sigxent.core import layout

    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "triton")
    weight = {"class": torch.rand(shape[-1]), "full": torch.rand(shape), "middle": torch.rand(1, shape[1], 1),
              None: None}[weight_kind]
    sizes, _, _ = layout.collapse(torch.Size(shape), [weight, None], classes_apart=True)
    n_rows = math.prod(shape[:-1])
    assert layout.ndim(sizes) == (3 if weight_kind == "middle" else 1 if n_rows == 1 else 2), sizes
    assert sizes[-1] == shape[-1]
    x = (torch.randn(shape) * 4).requires_grad_()
    index = torch.randint(0, shape[-1] + 1, shape[:-1])
    dense = one_hot(index, shape[-1])
    for reduction, smoothing in [("none", 0.0), ("sum", 0.1)]:
        loss = fs.sigmoid_focal_loss(x, index, 0.25, 2.0, reduction, weight=weight, label_smoothing=smoothing)
        (gx,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
        same = fs.sigmoid_focal_loss(x, dense.to(torch.uint8), 0.25, 2.0, reduction, weight=weight,
                                     label_smoothing=smoothing)
        (same_gx,) = torch.autograd.grad(same, x, torch.ones_like(same))
        assert torch.equal(loss, same) and torch.equal(gx, same_gx), reduction
        xd = x.detach().double().requires_grad_()
        want = torchvision_focal(xd, dense, 0.25, 2.0, reduction, weight, smoothing)
        assert_close(loss, want, torch.float32)
        assert_close(gx, torch.autograd.grad(want, xd, torch.ones_like(want))[0], torch.float32)
    if n_rows > 2:
        bad = index.clone().view(-1)
        bad[1], bad[-1] = -2, shape[-1] + 1
        # (the op itself: the front end checks CPU tensors' indices and raises)
        loss, *_ = torch.ops.fused_sigxent.sigmoid_ce_fwd(x.detach(), bad.view(index.shape), None, None, torch.zeros(()),
                                                         R.NONE, torch.float32, False, False, torch.full((), 2.0),
                                                         None, True)
        loss = loss.view(n_rows, -1)
        poisoned = torch.zeros(n_rows, dtype=torch.bool)
        poisoned[[1, -1]] = True
        assert loss[poisoned].isnan().all() and loss[~poisoned].isfinite().all()


def test_one_launch_forward_one_launch_backward(launches, monkeypatch):
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "triton")
    x = torch.randn(3, 13, requires_grad=True)
    soft = torch.rand(3, 13, requires_grad=True)
    cases = {
        "mean, gradient in the forward": lambda: fs.sigmoid_focal_loss(x, soft, reduction="mean"),
        "sum, class weights, smoothing": lambda: fs.sigmoid_focal_loss(
            x, soft, 0.75, 0.5, "sum", weight=torch.rand(13), label_smoothing=0.1),
        "none, class indices": lambda: fs.sigmoid_focal_loss(x, torch.tensor([0, 13, 4]), reduction="none"),
        "none, hard labels": lambda: fs.sigmoid_focal_loss(x, soft.detach() > 0.5, gamma=0.5),
    }
    for name, loss_fn in cases.items():
        launches.clear()
        loss = loss_fn()
        assert launches == {"_sigmoid_ce_fwd_kernel": 1}, (name, launches)
        launches.clear()
        loss.backward(torch.randn(loss.shape))
        assert sum(launches.values()) == 1, (name, launches)


def test_bad_arguments_raise_before_any_kernel(launches, monkeypatch):
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "triton")
    x, z = torch.randn(2, 3), torch.rand(2, 3)
    cases = [
        (ValueError, "gamma", lambda: fs.sigmoid_focal_loss(x, z, gamma=-0.5)),
        (ValueError, "gamma", lambda: fs.sigmoid_focal_loss(x, z, gamma=math.inf)),
        (ValueError, "alpha", lambda: fs.sigmoid_focal_loss(x, z, alpha=1.5)),
        (TypeError, "gamma", lambda: fs.sigmoid_focal_loss(x, z, gamma="2")),
        (TypeError, "gamma", lambda: fs.sigmoid_focal_loss(x, z, gamma=torch.tensor([2.0]))),
        (TypeError, "gamma", lambda: fs.sigmoid_focal_loss(x, z, gamma=torch.tensor(2))),
        (TypeError, "alpha", lambda: fs.sigmoid_focal_loss(x, z, alpha=True)),
        (TypeError, "alpha", lambda: fs.sigmoid_focal_loss(x, z, alpha=None)),
        (ValueError, "targets", lambda: fs.sigmoid_focal_loss(x, torch.rand(3, 2))),
        (TypeError, "targets", lambda: fs.sigmoid_focal_loss(x, z.to(torch.int32))),
        (ValueError, "targets", lambda: fs.sigmoid_focal_loss(x, torch.tensor([0, 1, 2]))),
        (TypeError, "inputs", lambda: fs.sigmoid_focal_loss(x.long(), z)),
        (ValueError, "weight", lambda: fs.sigmoid_focal_loss(x, z, weight=torch.rand(4))),
        (ValueError, "reduction", lambda: fs.sigmoid_focal_loss(x, z, reduction="avg")),
        (ValueError, "label_smoothing", lambda: fs.sigmoid_focal_loss(x, z, label_smoothing=2.0)),
        (ValueError, "gamma", lambda: fs.SigmoidFocalLoss(gamma=-1.0)),
        (TypeError, "alpha", lambda: fs.SigmoidFocalLoss(alpha="0.25")),
    ]
    for error, name, call in cases:
        with pytest.raises(error, match=name):
            call()
    assert launches == {}


def test_module_is_torchvision_ordered_with_mean_default(backend):
    x, z = torch.randn(SHAPE), torch.rand(SHAPE)
    w = torch.rand(SHAPE[-1])
    module = fs.SigmoidFocalLoss(0.5, 1.0, weight=w)
    assert_close(module(x, z), torchvision_focal(x, z, 0.5, 1.0, "mean", w), torch.float32)
    assert "weight" in module.state_dict() and "gamma=1.0" in repr(module)


def test_cpu_auto_runs_focal_in_tiles(monkeypatch):
    # The CPU path's tiles implement the focal loss, of dense and of
    # class-index targets (tests/impl/test_cpu.py): the reference never runs.
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "auto")
    seen = []
    ref_fwd = _reference.sigmoid_ce_fwd
    monkeypatch.setattr(_reference, "sigmoid_ce_fwd", lambda *a, **k: seen.append(len(a)) or ref_fwd(*a, **k))
    x, z = torch.randn(SHAPE), torch.rand(SHAPE)
    assert impl.implementation(x.device).sigmoid_ce_fwd is _cpu.sigmoid_ce_fwd
    fs.binary_cross_entropy_with_logits(x, z)
    assert seen == []
    got = fs.sigmoid_focal_loss(x, z, reduction="sum")
    got_index = fs.sigmoid_focal_loss(x, torch.tensor([0, 13, 2]), reduction="sum")
    assert seen == []
    assert_close(got, torchvision_focal(x, z, 0.25, 2.0, "sum"), torch.float32)
    assert_close(got_index, torchvision_focal(x, one_hot(torch.tensor([0, 13, 2]), 13), 0.25, 2.0, "sum"),
                 torch.float32)


def test_opcheck_focal_op(backend):
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    z = torch.rand(2, 5, dtype=torch.float64, requires_grad=True)
    s, gamma, alpha = (torch.tensor(v, dtype=torch.float64) for v in (0.1, 1.5, 0.25))
    torch.library.opcheck(torch.ops.fused_sigxent.sigmoid_ce_fwd,
                          (x, z, None, None, s, R.TORCH_MEAN, torch.float64, False, False, gamma, alpha, False))


def test_double_backward_forward_ad_and_vmap(backend):
    # create_graph, forward AD and torch.func take the reference's plain ops
    # (the same formulas): checked against finite differences in float64.
    x = (torch.randn(2, 3, dtype=torch.float64) * 2).requires_grad_()
    z = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    for gamma in [0.5, 2.0]:
        def f(x, z, w, gamma=gamma):
            return fs.sigmoid_focal_loss(x, z, 0.25, gamma, "sum", weight=w, label_smoothing=0.1)

        assert torch.autograd.gradcheck(f, (x, z, w), check_forward_ad=True)
        assert torch.autograd.gradgradcheck(f, (x, z, w))
    batched = torch.func.vmap(lambda x: fs.sigmoid_focal_loss(x, z.detach(), reduction="mean"))(x.detach()[None] + 1)
    assert_close(batched[0], torchvision_focal(x.detach() + 1, z.detach(), 0.25, 2.0, "mean"), torch.float64)
    grads = torch.func.grad(lambda x: fs.sigmoid_focal_loss(x, z.detach(), reduction="sum"))(x.detach())
    xd = x.detach().clone().requires_grad_()
    torchvision_focal(xd, z.detach(), 0.25, 2.0, "sum").backward()
    assert_close(grads, xd.grad, torch.float64)


@pytest.mark.parametrize("route", ["compiled", "double backward", "torch.func"])
def test_exact_zero_logits_on_the_plain_ops_routes(route, monkeypatch):
    # A zero-initialized head's logits are exactly 0, where the focal factor's
    # |x| and the loss's relu terms meet: autograd differentiates them there
    # on these routes (op/test_derivatives.py's twin test has the cross entropy).
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "auto")
    x = torch.randn(SHAPE, dtype=torch.float64) * 2
    x.view(-1)[::2] = 0
    z, w = torch.rand(SHAPE, dtype=torch.float64), torch.rand(SHAPE[-1], dtype=torch.float64) + 0.1
    leaves = [t.clone().requires_grad_() for t in (x, z, w)]

    def ours(x, z, w):
        return fs.sigmoid_focal_loss(x, z, 0.25, 2.0, "mean", weight=w, label_smoothing=0.1)

    def oracle(x, z, w):
        return torchvision_focal(x, z, 0.25, 2.0, "mean", weight=w, label_smoothing=0.1)

    if route == "double backward":
        got, want = second_derivatives(ours, leaves), second_derivatives(oracle, leaves)
    else:
        torch._dynamo.reset()
        if route == "compiled":
            got = torch.autograd.grad(torch.compile(ours, fullgraph=True)(*leaves), leaves)
        else:
            got = torch.compile(torch.func.grad(ours, argnums=(0, 1, 2)), fullgraph=True)(x, z, w)
        want = torch.autograd.grad(oracle(*leaves), leaves)
    for g, t, name in zip(got, want, "xzw"):
        assert_close(g, t, torch.float64, msg=f"d/d{name}")


def test_compiles_without_graph_breaks():
    # The CPU path under torch.compile: plain ops Inductor fuses.
    x = torch.randn(SHAPE, requires_grad=True)
    z = torch.rand(SHAPE)

    def step(x, z):
        return fs.sigmoid_focal_loss(x * 2, z, 0.25, 2.0, "mean")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(x, z)
    (gx,) = torch.autograd.grad(got, x)
    want = step(x, z)
    (want_gx,) = torch.autograd.grad(want, x)
    assert_close(got, want, torch.float32)
    assert_close(gx, want_gx, torch.float32)


def test_tolerances_cover_every_dtype():
    assert set(DTYPES) <= set(TOLERANCES)


def test_soft_labels_outside_the_unit_interval_are_nan_where_1_minus_p_t_is_negative(backend):
    # Section 2 allows such labels; the focal factor's 1 - p_t is then
    # negative for some logits: NaN there (the log-space definition), the
    # same numbers elsewhere, on every backend and the CPU path.
    x = torch.tensor([[-2.0, -0.5, 0.5, 2.0]] * 2)
    z = torch.tensor([[2.0] * 4, [-0.5] * 4])
    got = fs.sigmoid_focal_loss(x, z, 0.25, 2.0, "none")
    want = _reference.sigmoid_ce_fwd(x, z, None, None, torch.tensor(0.0), R.NONE, torch.float32, False, False,
                                     torch.tensor(2.0), torch.tensor(0.25))[0]
    assert want.isnan().sum() == 2
    assert_close(got, want, torch.float32)


def test_labels_a_hair_outside_the_unit_interval_and_gamma_zero_label_gradients(backend):
    # z' = -1e-9 at x = -25: 1 - p_t < 0, NaN (a formed from z', not from a
    # rounded 1 - z'), the same on every backend and the CPU path; and
    # gamma = 0 gives the labels a finite gradient even where log(1 - p_t)
    # is NaN (alpha_t dce/dz' + (2 alpha - 1) ce).
    results = []
    for name in (backend, "auto"):
        os.environ["FUSED_SIGXENT_BACKEND"] = name
        x = torch.tensor([[-25.0, 3.0], [-20.0, -1.0]], requires_grad=True)
        z = torch.tensor([[-1e-9, 1.0], [-3e-8, 0.0]])
        loss = fs.sigmoid_focal_loss(x, z, reduction="none")
        (gx,) = torch.autograd.grad(loss.sum(), x)
        x2 = torch.tensor([[5.0, -5.0, 0.5]], requires_grad=True)
        z2 = torch.tensor([[1.5, -0.5, 0.5]], requires_grad=True)
        fs.sigmoid_focal_loss(x2, z2, alpha=0.25, gamma=0.0, reduction="sum").backward()
        results.append((loss.detach(), gx, z2.grad))
        assert loss[:, 0].isnan().all() and loss[:, 1].isfinite().all()
        # x = -5, z' = -0.5: alpha_t = 1, ce = 1.5 x + softplus(5), dce/dz' = -x = 5
        ce = 1.5 * -5.0 + F.softplus(torch.tensor(5.0)).item()
        assert_close(z2.grad[0, 1], torch.tensor(5.0 + (2 * 0.25 - 1) * ce), torch.float32)
    for a, b in zip(*results):
        assert_close(a, b, torch.float32)
