"""PyTorch front end: a drop-in for F.binary_cross_entropy_with_logits and
nn.BCEWithLogitsLoss, through both backends."""

import math

import pytest
import torch
import torch.nn.functional as F

import fused_sigxent as fs
from conftest import assert_close

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# Every rank from 0 to 4, ragged sizes, and an empty batch.
SHAPES = [(), (5,), (3, 7), (2, 3, 5), (2, 1, 3, 4), (0, 5)]


def coefficient_shapes(shape):
    """Shapes that broadcast to `shape` by NumPy rules: none, full, per last
    dimension (a class vector), per first dimension, a 0-d scalar."""
    shapes = [None, shape, ()]
    if len(shape) >= 1:
        shapes.append((shape[-1],))
    if len(shape) >= 2:
        shapes.append((shape[0],) + (1,) * (len(shape) - 1))
    return shapes


def torch_in_float64(x, z, w, p, reduction):
    """PyTorch's own loss and gradients, computed in float64."""
    xd = x.detach().double().requires_grad_()
    zd = z.detach().double().requires_grad_()
    loss = F.binary_cross_entropy_with_logits(
        xd, zd, None if w is None else w.double(), reduction=reduction, pos_weight=None if p is None else p.double()
    )
    return loss, xd, zd


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_drop_in_matches_pytorch(backend, dtype, reduction):
    for shape in SHAPES:
        for w_shape in coefficient_shapes(shape):
            for p_shape in [None, shape[-1:]]:
                x = (torch.randn(shape) * 4).to(dtype).requires_grad_()
                z = torch.rand(shape).to(dtype).requires_grad_()
                w = None if w_shape is None else torch.rand(w_shape).to(dtype)
                p = None if p_shape is None else (torch.rand(p_shape) * 3).to(dtype)
                where = f"shape {shape}, weight {w_shape}, pos_weight {p_shape}"
                loss = fs.binary_cross_entropy_with_logits(x, z, w, reduction, p)
                expected, xd, zd = torch_in_float64(x, z, w, p, reduction)
                assert loss.dtype == dtype and loss.shape == expected.shape, where
                assert_close(loss, expected, dtype, msg=where)
                if x.numel() == 0:
                    continue
                grad = torch.randn(loss.shape, dtype=torch.float64)
                gx, gz = torch.autograd.grad(loss, (x, z), grad.to(dtype))
                ex, ez = torch.autograd.grad(expected, (xd, zd), grad)
                assert gx.dtype == dtype and gz.dtype == dtype
                assert_close(gx, ex, dtype, msg=where)
                assert_close(gz, ez, dtype, msg=where)


def test_empty_reductions_match_pytorch(backend):
    x, z = torch.empty(0, 3), torch.empty(0, 3)
    assert math.isnan(fs.binary_cross_entropy_with_logits(x, z).item())
    assert fs.binary_cross_entropy_with_logits(x, z, reduction="sum").item() == 0.0
    assert fs.binary_cross_entropy_with_logits(x, z, reduction="none").shape == (0, 3)


@pytest.mark.parametrize("view", ["transposed", "sliced", "expanded_labels"])
def test_non_contiguous_inputs(backend, view):
    base_x, base_z = torch.randn(9, 14), torch.rand(9, 14)
    if view == "transposed":
        x, z = base_x.t(), base_z.t()
    elif view == "sliced":
        x, z = base_x[::2, 1::3], base_z[::2, 1::3]
    else:
        x, z = base_x, base_z[:1].expand(9, 14)
    w = torch.rand(x.shape[-1] * 2)[::2]  # a strided class vector
    for reduction in ["none", "sum", "mean"]:
        xg, xc = x.clone().requires_grad_(), x.contiguous().requires_grad_()
        a = fs.binary_cross_entropy_with_logits(xg, z, w, reduction)
        b = fs.binary_cross_entropy_with_logits(xc, z.contiguous(), w.contiguous(), reduction)
        assert_close(a, b)
        g = torch.randn(a.shape)
        assert_close(torch.autograd.grad(a, xg, g)[0], torch.autograd.grad(b, xc, g)[0])


@pytest.mark.parametrize("label_dtype", [torch.bool, torch.uint8])
def test_hard_labels_equal_float_labels_bitwise(backend, label_dtype):
    x = torch.randn(4, 33, requires_grad=True)
    hard = torch.rand(4, 33) > 0.5
    for reduction in ["none", "sum", "mean"]:
        a = fs.binary_cross_entropy_with_logits(x, hard.to(label_dtype), reduction=reduction, label_smoothing=0.1)
        b = fs.binary_cross_entropy_with_logits(x, hard.float(), reduction=reduction, label_smoothing=0.1)
        assert torch.equal(a, b)
        g = torch.randn(a.shape)
        assert torch.equal(torch.autograd.grad(a, x, g)[0], torch.autograd.grad(b, x, g)[0])


def test_label_smoothing_is_smoothed_labels(backend):
    x, z = torch.randn(6, 5), (torch.rand(6, 5) > 0.5).float()
    s = 0.2
    a = fs.binary_cross_entropy_with_logits(x, z, label_smoothing=s)
    b = F.binary_cross_entropy_with_logits(x, z * (1 - s) + 0.5 * s)
    assert_close(a, b)


def test_module_matches_pytorch_module_and_loads_its_state(backend):
    w, p = torch.rand(1, 6), torch.rand(6) * 2
    ours = fs.BCEWithLogitsLoss(weight=w, pos_weight=p)
    theirs = torch.nn.BCEWithLogitsLoss(weight=w, pos_weight=p)
    x, z = torch.randn(4, 6), torch.rand(4, 6)
    assert_close(ours(x, z), theirs(x, z))
    assert set(ours.state_dict()) == {"weight", "pos_weight"}
    fresh = fs.BCEWithLogitsLoss(weight=torch.zeros(1, 6), pos_weight=torch.zeros(6), reduction="sum")
    fresh.load_state_dict(theirs.state_dict())
    assert torch.equal(fresh.weight, w) and torch.equal(fresh.pos_weight, p)
    theirs.load_state_dict(ours.state_dict())
    assert fs.BCEWithLogitsLoss()(x, z).shape == ()
    assert fs.BCEWithLogitsLoss(reduction="none", label_smoothing=0.1)(x, z).shape == (4, 6)


def test_module_follows_to(backend):
    ours = fs.BCEWithLogitsLoss(weight=torch.rand(3)).to(torch.float64)
    assert ours.weight.dtype == torch.float64
