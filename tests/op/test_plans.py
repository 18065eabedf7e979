"""Launch plans (kernels/_launch.py), and the front end's checks skipped
for a signature that passed (call plans, fused_sigxent/op/routes.py): what a
call works out once per signature, and that a replayed call is the same
call (under the interpreter, checked against the reference)."""

import pytest
import torch

import fused_sigxent as fs
from fused_sigxent.core import plans as _plans
from fused_sigxent.frontends import torch_api as _torch_api
from fused_sigxent.core import layout
from fused_sigxent.kernels import _launch

from conftest import assert_close, on_reference


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "triton")


def _reference(*args, **kwargs):
    return on_reference(fs.binary_cross_entropy_with_logits, *args, **kwargs)


def test_a_repeated_call_works_out_nothing_again(triton_backend, monkeypatch):
    # Layout, variant and grid are worked out once per signature; new values
    # of the same signature replay the plan and get their own results.
    collapsed = []
    collapse_plan = layout.collapse_plan
    monkeypatch.setattr(layout, "collapse_plan", lambda *a, **k: collapsed.append(a[0]) or collapse_plan(*a, **k))
    for step in range(3):
        x = torch.randn(6, 37, requires_grad=True)
        z, w, p = torch.rand(6, 37), torch.rand(37), torch.rand(6, 1) * 3
        loss = fs.binary_cross_entropy_with_logits(x, z, w, pos_weight=p, label_smoothing=0.1 * step)
        loss.backward(torch.tensor(0.5))
        x_ref = x.detach().requires_grad_()
        want = _reference(x_ref, z, w, pos_weight=p, label_smoothing=0.1 * step)
        want.backward(torch.tensor(0.5))
        assert_close(loss, want)
        assert_close(x.grad, x_ref.grad)
    assert len(collapsed) == 1  # the forward's plan (the backward scales what it wrote)
    assert sorted(name for name, _ in _launch.launches()) == ["sigmoid_ce_fwd", "sigmoid_ce_scale_"]


@pytest.mark.parametrize("change", ["shape", "dtype", "weight stride", "weight shape", "reduction",
                                    "alignment", "smoothing dtype"])
def test_anything_a_launch_depends_on_makes_a_plan_of_its_own(triton_backend, change):
    from fused_sigxent.kernels.sigmoid_ce_fwd import sigmoid_ce_fwd

    def call(x, w, reduction=5, smoothing=torch.zeros(())):
        z = torch.rand(x.shape, dtype=x.dtype)
        loss, _, _, _ = sigmoid_ce_fwd(x, z, w, None, smoothing, reduction, x.dtype, False, False)
        want, _, _, _ = _reference_op(x, z, w, smoothing.to(torch.float32), reduction)
        assert_close(loss, want)

    x, w = torch.randn(4, 33), torch.rand(33)
    call(x, w)
    call(torch.randn(4, 33), torch.rand(33))  # new values, same signature
    assert len(_launch.PLANS) == 1
    other = {
        "shape": lambda: call(torch.randn(4, 34), torch.rand(34)),
        "dtype": lambda: call(x.double(), w.double()),
        "weight stride": lambda: call(x, torch.rand(33, 2)[:, 0]),
        "weight shape": lambda: call(x, torch.rand(4, 1)),
        "reduction": lambda: call(x, w, reduction=0),
        "alignment": lambda: call(torch.randn(4 * 33 + 1)[1:].view(4, 33), w),  # 4 bytes past 16
        "smoothing dtype": lambda: call(x, w, smoothing=torch.zeros((), dtype=torch.float64)),
    }[change]
    other()
    assert len(_launch.PLANS) == 2


def _reference_op(x, z, w, smoothing, reduction):
    from fused_sigxent.impl import reference as _reference

    return _reference.sigmoid_ce_fwd(x, z, w, None, smoothing, reduction, x.dtype, False, False)


def test_a_materialized_coefficient_is_materialized_per_call(triton_backend):
    # Rank 5 with an interleaved broadcast: the coefficient is expanded to
    # full size, which a replayed plan must redo from each call's values.
    shape = (2, 3, 2, 3, 2)
    for _ in range(2):
        x, z = torch.randn(shape, requires_grad=True), torch.rand(shape)
        w = torch.rand(2, 1, 2, 1, 2)
        loss = fs.binary_cross_entropy_with_logits(x, z, w)
        assert_close(loss, _reference(x.detach(), z, w))
    assert len(_launch.launches()) == 1


def test_gradients_not_asked_for_are_fresh_empty_tensors(triton_backend):
    # 0-size, in the labels' own dtype (bool labels are read as bytes, and
    # share nothing with a uint8 call), a new tensor every call: a caller
    # that resizes one changes no later call's output. Through the
    # dispatcher, which raises where an output aliases another.
    from fused_sigxent.kernels.sigmoid_ce_fwd import sigmoid_ce_fwd

    x = torch.randn(3, 5)
    for labels in [torch.rand(3, 5) > 0.5, (torch.rand(3, 5) > 0.5).to(torch.uint8), torch.rand(3, 5) > 0.5]:
        _, _, gl, gz = sigmoid_ce_fwd(x, labels, None, None, torch.zeros(()), 5, x.dtype, False, False)
        assert gl.shape == gz.shape == (0,) and gz.dtype == labels.dtype and gl.dtype == x.dtype
        gl.resize_(6).fill_(7)
        out = torch.ops.fused_sigxent.sigmoid_ce_fwd(x, labels, None, None, torch.zeros(()), 5, x.dtype, False, False)
        assert out[2].shape == (0,) and out[3].dtype == labels.dtype


def test_an_evaluation_pass_first_leaves_training_working(triton_backend):
    # A first call under inference_mode makes the plan, the workspace and the
    # smoothing constant: none of them may be an inference tensor, which a
    # later training call could not save for backward.
    x, z = torch.randn(4, 6), torch.rand(4, 6)
    with torch.inference_mode():
        fs.binary_cross_entropy_with_logits(x, z, label_smoothing=0.25)
    xg = x.clone().requires_grad_()
    loss = fs.binary_cross_entropy_with_logits(xg, z, label_smoothing=0.25)
    loss.backward()
    x_ref = x.clone().requires_grad_()
    _reference(x_ref, z, label_smoothing=0.25).backward()
    assert_close(xg.grad, x_ref.grad)


def test_plans_are_bounded(triton_backend, monkeypatch):
    monkeypatch.setattr(_plans, "MAX_PLANS", 3)
    for n in range(1, 8):
        x, z = torch.randn(n), torch.rand(n)
        assert_close(fs.binary_cross_entropy_with_logits(x, z), _reference(x, z))
        assert len(_launch.PLANS) <= 3


def test_a_replaced_environment_is_read(monkeypatch):
    # A test's mock of os.environ (not monkeypatch.setenv) still chooses the backend.
    import os

    from fused_sigxent.core import backend as _backend

    monkeypatch.setattr(os, "environ", {"FUSED_SIGXENT_BACKEND": "reference"})
    assert _backend.backend() == "reference"
    monkeypatch.setattr(os, "environ", {"FUSED_SIGXENT_BACKEND": "bogus"})
    with pytest.raises(ValueError, match="bogus"):
        _backend.backend()


def test_validation_is_skipped_only_for_a_signature_that_passed(monkeypatch):
    checks = []
    tensors = _torch_api._tensors
    monkeypatch.setattr(_torch_api, "_tensors", lambda *a: checks.append(1) or tensors(*a))
    x, z = torch.randn(4, 6), torch.rand(4, 6)
    for _ in range(3):
        fs.binary_cross_entropy_with_logits(x, z)
    assert len(checks) == 1
    # Another signature is checked, and its errors still raise, every time.
    for _ in range(2):
        with pytest.raises(ValueError, match=r"same shape.*\(4, 5\)"):
            fs.binary_cross_entropy_with_logits(x, torch.rand(4, 5))
        with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
            fs.binary_cross_entropy_with_logits(x, z, [1.0] * 6)
    # A converted argument (an integer weight becomes float32) is checked,
    # and converted, on every call.
    before = len(checks)
    for _ in range(2):
        assert_close(fs.binary_cross_entropy_with_logits(x, z, torch.ones(6, dtype=torch.int64)),
                     fs.binary_cross_entropy_with_logits(x, z))
    assert len(checks) - before == 2  # the two calls with the integer weight; those without it passed before
