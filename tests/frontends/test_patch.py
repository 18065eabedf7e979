"""fs.patch(): PyTorch's own entry points (F.binary_cross_entropy_with_logits,
nn.BCEWithLogitsLoss) and torchvision's sigmoid_focal_loss reach this
package's op while patched, and their originals again after."""

import contextlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_sigxent as fs
from conftest import OpNames, assert_close, torchvision_focal

ORIGINAL = F.binary_cross_entropy_with_logits


@pytest.fixture(autouse=True)
def _unpatched():
    yield
    fs.unpatch()
    assert F.binary_cross_entropy_with_logits is ORIGINAL


def _ops(fn) -> list[str]:
    with OpNames() as mode:
        fn()
    return mode.names


def _inputs():
    return torch.randn(4, 6, requires_grad=True), (torch.rand(4, 6) > 0.5).float()


def test_a_dispatch_mode_sees_the_package_s_op_only_while_patched():
    x, z = _inputs()
    module = nn.BCEWithLogitsLoss(pos_weight=torch.rand(6) + 0.5)
    for call in (lambda: F.binary_cross_entropy_with_logits(x, z).backward(),
                 lambda: module(x, z).backward()):
        assert "fused_sigxent.sigmoid_ce_fwd.default" not in _ops(call)
        fs.patch()
        names = _ops(call)
        assert "fused_sigxent.sigmoid_ce_fwd.default" in names
        assert not any("binary_cross_entropy_with_logits" in n for n in names)
        fs.unpatch()
        assert "fused_sigxent.sigmoid_ce_fwd.default" not in _ops(call)


def test_with_patch_restores_on_exit_and_gives_pytorch_s_numbers():
    x, z = _inputs()
    weight, pos_weight = torch.rand(4, 1), torch.rand(6) + 0.5
    for reduction in ("none", "mean", "sum"):
        want = ORIGINAL(x, z, weight, reduction=reduction, pos_weight=pos_weight)
        gwant = torch.autograd.grad(want.sum(), x)[0]
        with fs.patch() as patched:
            assert F.binary_cross_entropy_with_logits is not ORIGINAL and patched.replaced
            got = F.binary_cross_entropy_with_logits(x, z, weight, reduction=reduction, pos_weight=pos_weight)
            assert "Planned" in type(got.grad_fn).__name__
        assert F.binary_cross_entropy_with_logits is ORIGINAL
        assert_close(got, want)
        assert_close(torch.autograd.grad(got.sum(), x)[0], gwant)


def test_patch_is_idempotent_and_an_inner_with_keeps_the_outer_patch():
    fs.patch()
    patched = F.binary_cross_entropy_with_logits
    with fs.patch() as inner:
        assert not inner.replaced and F.binary_cross_entropy_with_logits is patched
    assert F.binary_cross_entropy_with_logits is patched
    fs.unpatch()
    assert F.binary_cross_entropy_with_logits is ORIGINAL


@pytest.mark.parametrize("call, package", [
    (lambda x, z: F.binary_cross_entropy_with_logits(x, z, size_average=False), False),  # legacy arguments
    (lambda x, z: F.binary_cross_entropy_with_logits(x, z, reduce=False), False),
    (lambda x, z: F.binary_cross_entropy_with_logits(x, z.bool()), True),  # hard labels: ours reads bytes
    (lambda x, z: F.binary_cross_entropy_with_logits(x, z, torch.rand(6), reduction="sum"), True),
    (lambda x, z: F.binary_cross_entropy_with_logits(x, z, pos_weight=torch.rand(1, 6)), True),
    (lambda x, z: F.binary_cross_entropy_with_logits(x, z, pos_weight=torch.rand(2, 4, 6)), False),  # grows x
])
def test_arguments_the_package_takes_reach_it_others_the_original(call, package):
    x, z = _inputs()
    with fs.patch():
        with OpNames() as mode:
            try:
                call(x, z)
            except RuntimeError:  # PyTorch's own error, for what it refuses too
                assert not package
    assert ("fused_sigxent.sigmoid_ce_fwd.default" in mode.names) == package


def test_calls_the_package_does_not_take_go_to_the_original_unchanged():
    x, z = _inputs()
    with fs.patch():
        # Legacy size_average/reduce: PyTorch's own deprecated behaviour.
        with pytest.warns(UserWarning):
            assert_close(F.binary_cross_entropy_with_logits(x, z, size_average=False),
                         ORIGINAL(x, z, reduction="sum"))
        # Mismatched shapes: PyTorch's own error, not ours.
        with pytest.raises(ValueError, match="Target size"):
            F.binary_cross_entropy_with_logits(x, z[:2])
        # A weight that does not broadcast: the original decides.
        with pytest.raises(RuntimeError):
            F.binary_cross_entropy_with_logits(x, z, torch.rand(5))
        # An integer input: the original's error.
        with pytest.raises(RuntimeError):
            F.binary_cross_entropy_with_logits(x.detach().long(), z)


def test_a_hugging_face_style_multi_label_head_trains_the_same():
    # A model that builds nn.BCEWithLogitsLoss() inside its forward, as
    # Hugging Face's problem_type="multi_label_classification" heads do.
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = nn.Linear(8, 5)

        def forward(self, features, labels):
            return nn.BCEWithLogitsLoss()(self.classifier(features), labels)

    torch.manual_seed(3)
    features, labels = torch.randn(16, 8), (torch.rand(16, 5) > 0.7).float()
    runs = []
    for patched in (False, True):
        torch.manual_seed(4)
        model = Head()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = []
        with fs.patch() if patched else contextlib.nullcontext():
            for _ in range(5):
                optimizer.zero_grad()
                loss = model(features, labels)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        runs.append(losses)
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


@pytest.fixture
def fake_torchvision(monkeypatch):
    """A torchvision whose ops hold the real formula (torchvision's tests'
    oracle), as installed: patch() finds it by import."""
    def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2, reduction="none"):
        return torchvision_focal(inputs, targets, float(alpha), float(gamma), reduction).to(inputs.dtype)

    package = types.ModuleType("torchvision")
    package.__path__ = []
    ops = types.ModuleType("torchvision.ops")
    focal_loss = types.ModuleType("torchvision.ops.focal_loss")
    ops.sigmoid_focal_loss = focal_loss.sigmoid_focal_loss = sigmoid_focal_loss
    ops.focal_loss, package.ops = focal_loss, ops
    for name, module in (("torchvision", package), ("torchvision.ops", ops),
                         ("torchvision.ops.focal_loss", focal_loss)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "torchvision" else None)
    return ops, focal_loss, sigmoid_focal_loss


def test_torchvision_s_focal_loss_is_routed_where_installed(fake_torchvision):
    ops, focal_loss, original = fake_torchvision
    x, z = _inputs()
    with fs.patch():
        for module in (ops, focal_loss):
            names = _ops(lambda: module.sigmoid_focal_loss(x, z, torch.tensor(0.25), 2, "mean").backward())
            assert "fused_sigxent.sigmoid_ce_fwd.default" in names
        assert_close(ops.sigmoid_focal_loss(x, z, 0.25, 2, "sum"), original(x, z, 0.25, 2, "sum"))
        with pytest.raises(KeyError):  # an unknown reduction: the original's own handling
            ops.sigmoid_focal_loss(x, z, reduction="average")
    assert ops.sigmoid_focal_loss is original and focal_loss.sigmoid_focal_loss is original


def test_a_patched_loss_compiles_without_a_graph_break():
    x, z = _inputs()
    with fs.patch():
        step = torch.compile(lambda a, b: nn.BCEWithLogitsLoss()(a, b), fullgraph=True, backend="aot_eager")
        loss = step(x, z)
        loss.backward()
    assert_close(loss, ORIGINAL(x, z))
    assert_close(x.grad, torch.autograd.grad(ORIGINAL(x, z), x)[0])


def test_a_wider_target_or_weight_dtype_goes_to_pytorch_which_promotes():
    # PyTorch's loss comes back in the promoted dtype (float32 input with a
    # float64 target: float64); this package keeps the logits' dtype, so such
    # calls are PyTorch's.
    x = torch.randn(3, 4)
    with fs.patch():
        for call in (lambda: F.binary_cross_entropy_with_logits(x, torch.rand(3, 4, dtype=torch.float64)),
                     lambda: F.binary_cross_entropy_with_logits(x.half(), torch.rand(3, 4)),
                     lambda: F.binary_cross_entropy_with_logits(x, torch.rand(3, 4), torch.rand(4).double())):
            names = _ops(call)
            assert "fused_sigxent.sigmoid_ce_fwd.default" not in names
            assert call().dtype == torch.promote_types(call().dtype, torch.float32)
