"""Extreme and special values: large logits, NaN, zero weights, through both backends."""

import math

import pytest
import torch

import fused_sigxent as fs
from conftest import assert_close, oracle_elementwise

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("magnitude", [100.0, 1e4])
def test_large_logits_give_finite_loss_and_grads(backend, dtype, magnitude):
    # +-magnitude against agreeing and disagreeing hard and soft labels;
    # 1e4 is representable in every dtype (float16's max is 65504).
    x = torch.tensor([magnitude, -magnitude] * 3, dtype=dtype).requires_grad_()
    z = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5], dtype=dtype).requires_grad_()
    for reduction in ["none", "sum", "mean"]:
        loss = fs.binary_cross_entropy_with_logits(x, z, reduction=reduction, pos_weight=torch.tensor(2.0))
        gx, gz = torch.autograd.grad(loss, (x, z), torch.ones_like(loss))
        assert torch.isfinite(loss).all() and torch.isfinite(gx).all() and torch.isfinite(gz).all()
    loss = fs.sigmoid_cross_entropy_with_logits(labels=z.detach(), logits=x.detach())
    assert_close(loss, oracle_elementwise(x.detach(), z.detach()).to(dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_gives_nan_out(backend, dtype):
    x = torch.tensor([0.5, math.nan, -1.0], dtype=dtype, requires_grad=True)
    z = torch.tensor([1.0, 0.0, 1.0], dtype=dtype)
    elementwise = fs.binary_cross_entropy_with_logits(x, z, reduction="none")
    assert torch.isnan(elementwise[1]) and not torch.isnan(elementwise[[0, 2]]).any()
    for reduction in ["sum", "mean"]:
        loss = fs.binary_cross_entropy_with_logits(x, z, reduction=reduction)
        assert torch.isnan(loss)
        (gx,) = torch.autograd.grad(loss, x)
        assert torch.isnan(gx[1]) and not torch.isnan(gx[[0, 2]]).any()
    nan_label = torch.tensor([0.5, math.nan, 0.0], dtype=dtype)
    assert torch.isnan(fs.sigmoid_cross_entropy(nan_label, x.detach(), reduction=fs.Reduction.SUM))


def test_zero_weight_gives_exact_zero_loss_and_gradient(backend):
    x = torch.randn(4, 7, requires_grad=True)
    z = torch.rand(4, 7, requires_grad=True)
    w = torch.rand(4, 7)
    w[:, ::2] = 0
    loss = fs.sigmoid_cross_entropy(z, x, w, 0.1, fs.Reduction.NONE)
    assert (loss[:, ::2] == 0).all() and (loss[:, 1::2] != 0).all()
    total = fs.sigmoid_cross_entropy(z, x, w, 0.1, fs.Reduction.SUM_BY_NONZERO_WEIGHTS)
    gx, gz = torch.autograd.grad(total, (x, z), torch.tensor(3.0))
    assert (gx[:, ::2] == 0).all() and (gz[:, ::2] == 0).all()
    assert (gx[:, 1::2] != 0).all()
