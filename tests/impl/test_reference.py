"""The reference path (`fused_sigxent/impl/reference.py`): the definition the
kernels are held to, checked against float64 math and PyTorch's own loss."""

import pytest
import torch
import torch.nn.functional as F

from conftest import TOLERANCES, assert_close, oracle_elementwise
from fused_sigxent.op import routes
from fused_sigxent.impl import reference as _reference
from fused_sigxent.core import reduction as R

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_pos_weight", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_elementwise_matches_float64_definition(dtype, with_pos_weight, smoothing):
    # (7, 13): ragged, both signs and |x| up to 30 where softplus saturates.
    x = (torch.randn(7, 13) * 10).to(dtype)
    z = torch.rand(7, 13).to(dtype)
    p = torch.rand(13) * 3 if with_pos_weight else None
    loss, *_ = _reference.sigmoid_ce_fwd(x, z, None, p, smoothing, R.NONE, dtype, False, False)
    assert loss.dtype == dtype
    assert_close(loss, oracle_elementwise(x, z, p, smoothing), dtype)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_pytorch_with_weights(reduction, dtype):
    x = torch.randn(5, 11, dtype=dtype, requires_grad=True)
    z = torch.rand(5, 11, dtype=dtype, requires_grad=True)
    w, p = torch.rand(1, 11, dtype=dtype), torch.rand(11, dtype=dtype) * 2
    code = R.TORCH_CODES[reduction]
    expected = F.binary_cross_entropy_with_logits(x, z, w, reduction=reduction, pos_weight=p)
    loss, denom, _, _ = _reference.sigmoid_ce_fwd(x, z, w, p, 0.0, code, dtype, False, False)
    assert_close(loss, expected)
    grad = torch.randn_like(expected)
    gx_ref, gz_ref = torch.autograd.grad(expected, (x, z), grad)
    gx, gz = _reference.sigmoid_ce_bwd(grad, x, z, w, p, denom, 0.0, code, True, True)
    assert_close(gx, gx_ref)
    assert_close(gz, gz_ref)


def test_seed_004_vector():
    # Printed by TF 2.x's documentation: logits, labels and the float32 losses.
    x = torch.tensor([1.0, -1.0, 0.0, 1.0, -1.0, 0.0, 0.0])
    z = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5])
    expected = torch.tensor([1.3132617, 0.3132617, 0.6931472, 0.3132617, 1.3132617, 0.6931472, 0.6931472])
    loss, *_ = _reference.sigmoid_ce_fwd(x, z, None, None, 0.0, R.NONE, torch.float32, False, False)
    torch.testing.assert_close(loss, expected, rtol=0, atol=2 ** -23 * 2)


@pytest.mark.parametrize("reduction", R.CODES)
def test_gradcheck_every_input(monkeypatch, reduction):
    # float64 gradcheck of logits, soft labels, a learned (1, C) weight and
    # pos_weight, through the op on the reference backend.
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "reference")

    def loss(x, z, w, p):
        return routes.sigmoid_ce(x, z, w, p, 0.2, reduction, x.dtype)

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    z = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(1, 4, dtype=torch.float64) + 0.1).requires_grad_()
    p = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(loss, (x, z, w, p))


def test_tolerance_table_covers_every_logits_dtype():
    assert set(TOLERANCES) == set(DTYPES)
