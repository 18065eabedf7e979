"""Call plans (fused_sigxent/op/routes.py): a plain eager call of a signature
seen before replays what its first call worked out. A replayed call must be
the same call (checked against the reference), anything the first call's
decisions read must make a plan of its own, and whatever a plan cannot
serve (an observer, a converted argument, a bad one) takes the op's route."""

import pytest
import torch

import fused_sigxent as fs
from fused_sigxent.op import routes as _eager
from fused_sigxent.core import plans as _plans

from conftest import OpNames, assert_close, on_reference


def _plans_made() -> list:
    """The call plans made for the backend in use (the reference's calls make their own)."""
    from fused_sigxent.core import backend as _backend

    return [plan for plan in _plans.PLANS.values()
            if isinstance(plan, _eager.CallPlan) and plan.backend == _backend.backend()]


def _grads(fn, x, *args, grad=None, **kwargs):
    """(loss, x.grad) of fn(x, *args, **kwargs), x a fresh leaf."""
    x = x.detach().requires_grad_()
    loss = fn(x, *args, **kwargs)
    loss.backward(torch.ones_like(loss) * 0.5 if grad is None else grad)
    return loss.detach(), x.grad


CALLS = {
    "plain": lambda x, z: fs.binary_cross_entropy_with_logits(x, z),
    "weighted": lambda x, z: fs.binary_cross_entropy_with_logits(
        x, z, torch.linspace(0.5, 2, x.shape[-1]), pos_weight=torch.full((x.shape[-1],), 3.0), label_smoothing=0.1),
    "none": lambda x, z: fs.binary_cross_entropy_with_logits(x, z, reduction="none"),
    "bool labels": lambda x, z: fs.binary_cross_entropy_with_logits(x, z > 0.5, reduction="sum"),
    "focal": lambda x, z: fs.sigmoid_focal_loss(x, z > 0.5, reduction="mean"),
    "tf": lambda x, z: fs.sigmoid_cross_entropy(z, x, label_smoothing=0.2),
    "tf elementwise": lambda x, z: fs.sigmoid_cross_entropy_with_logits(labels=z, logits=x),
}


@pytest.mark.parametrize("call", CALLS)
def test_a_replayed_call_is_the_same_call(backend, call):
    fn = CALLS[call]
    for _ in range(3):
        x, z = torch.randn(5, 13), torch.rand(5, 13)
        loss, grad = _grads(fn, x, z)
        want, want_grad = on_reference(_grads, fn, x, z)
        assert_close(loss, want)
        assert_close(grad, want_grad)
    assert len(_plans_made()) == 1


CHANGES = {
    "labels dtype": lambda x, z: (x, z.double()),
    "logits dtype": lambda x, z: (x.double(), z.double()),
    "stride": lambda x, z: (x.t().contiguous().t(), z),
    "alignment": lambda x, z: (torch.cat([torch.zeros(1), x.flatten()])[1:].view(x.shape), z),
    "shape": lambda x, z: (x[:, :-1].contiguous(), z[:, :-1].contiguous()),
    "labels requires grad": lambda x, z: (x, z.clone().requires_grad_()),
}


@pytest.mark.parametrize("change", CHANGES)
def test_anything_a_plan_read_makes_a_plan_of_its_own(backend, change):
    x, z = torch.randn(4, 9), torch.rand(4, 9)
    fn = CALLS["weighted"]
    for _ in range(2):
        _grads(fn, x, z)
    assert len(_plans_made()) == 1
    x2, z2 = CHANGES[change](x, z)
    for _ in range(2):
        x2 = x2.detach().requires_grad_()
        loss = fn(x2, z2)
        loss.backward()
        # PyTorch's own loss in float64 (no plan of ours), smoothing applied by hand.
        x_ref, n = x2.detach().double().requires_grad_(), x2.shape[-1]
        want = torch.nn.functional.binary_cross_entropy_with_logits(
            x_ref, z2.detach().double() * 0.9 + 0.05, torch.linspace(0.5, 2, n).double(),
            pos_weight=torch.full((n,), 3.0).double())
        want.backward()
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x2.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-6)
        if z2.requires_grad:
            assert z2.grad is not None
    assert len(_plans_made()) == 2


def test_grad_mode_reduction_smoothing_and_autocast_each_make_a_plan(backend):
    x, z = torch.randn(3, 7, dtype=torch.bfloat16), torch.rand(3, 7)
    ref = lambda **kw: on_reference(fs.binary_cross_entropy_with_logits, x, z, **kw)  # noqa: E731
    calls = [
        (lambda: fs.binary_cross_entropy_with_logits(x, z), ref()),
        (lambda: fs.binary_cross_entropy_with_logits(x, z, reduction="sum"), ref(reduction="sum")),
        (lambda: fs.binary_cross_entropy_with_logits(x, z, label_smoothing=0.3), ref(label_smoothing=0.3)),
    ]
    for fn, want in calls * 2:
        assert_close(fn(), want)
        with torch.no_grad():
            assert_close(fn(), want)
    assert len(_plans_made()) == 6
    # Autocast: PyTorch's loss runs (and returns) float32 for bf16 logits.
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fs.binary_cross_entropy_with_logits(x, z)
        assert out.dtype == torch.float32
        assert fs.binary_cross_entropy_with_logits(x, z).dtype == torch.bfloat16


def test_the_backend_is_read_on_every_call(monkeypatch):
    x, z = torch.randn(3, 5), torch.rand(3, 5)
    calls = []
    from fused_sigxent.impl import reference
    fwd = reference.sigmoid_ce_fwd
    monkeypatch.setattr(reference, "sigmoid_ce_fwd", lambda *a: calls.append(1) or fwd(*a))
    for name in ["triton", "reference", "triton", "reference"]:
        monkeypatch.setenv("FUSED_SIGXENT_BACKEND", name)
        fs.binary_cross_entropy_with_logits(x, z)
    assert len(calls) == 2


def test_an_observer_sees_the_op_after_a_plan_exists(backend):
    x, z = torch.randn(4, 6, requires_grad=True), torch.rand(4, 6)
    fs.binary_cross_entropy_with_logits(x, z).backward()
    assert len(_plans_made()) == 1
    with OpNames() as mode:
        fs.binary_cross_entropy_with_logits(x, z).backward()
    assert any("fused_sigxent.sigmoid_ce_fwd" in n for n in mode.names)
    assert any("fused_sigxent.sigmoid_ce_scale_" in n for n in mode.names)
    # A transform: the reference's differentiable ops, the same gradient.
    got = torch.func.grad(lambda t: fs.binary_cross_entropy_with_logits(t, z))(x.detach())
    want = torch.func.grad(lambda t: torch.nn.functional.binary_cross_entropy_with_logits(t, z))(x.detach())
    assert_close(got, want)


def test_a_mode_turned_on_between_forward_and_backward_sees_the_scale(backend):
    x, z = torch.randn(4, 6, requires_grad=True), torch.rand(4, 6)
    fs.binary_cross_entropy_with_logits(x, z).backward()
    loss = fs.binary_cross_entropy_with_logits(x, z)
    with OpNames() as mode:
        loss.backward(torch.tensor(2.0))
    assert any("fused_sigxent.sigmoid_ce_scale_" in n for n in mode.names)


def test_converted_arguments_are_converted_on_every_call(backend):
    # An integer weight becomes float32 afresh each call: no plan keeps it.
    x, z = torch.randn(3, 4), torch.rand(3, 4)
    for scale in [1, 2, 3]:
        w = torch.arange(4) * scale
        want = torch.nn.functional.binary_cross_entropy_with_logits(x, z, w.float())
        assert_close(fs.binary_cross_entropy_with_logits(x, z, w), want)
    assert _plans_made() == []
    for value in [2.0, 3.0]:  # a TF weight given as a number
        want = on_reference(fs.sigmoid_cross_entropy, z, x, weights=value)
        assert_close(fs.sigmoid_cross_entropy(z, x, weights=value), want)


def test_every_call_of_a_bad_signature_raises(backend):
    x, z = torch.randn(4, 6), torch.rand(4, 6)
    fs.binary_cross_entropy_with_logits(x, z)
    for _ in range(2):
        with pytest.raises(ValueError, match="same shape"):
            fs.binary_cross_entropy_with_logits(x, torch.rand(4, 5))
        with pytest.raises(TypeError, match="int32"):
            fs.binary_cross_entropy_with_logits(x, z.to(torch.int32))
        with pytest.raises(ValueError, match="reduction"):
            fs.binary_cross_entropy_with_logits(x, z, reduction="avg")
        with pytest.raises(TypeError):
            fs.binary_cross_entropy_with_logits(x, z, reduction=["mean"])
        with pytest.raises(ValueError, match="label_smoothing"):
            fs.binary_cross_entropy_with_logits(x, z, label_smoothing=1.5)


def test_class_indices_on_the_cpu_are_checked_on_every_call(backend):
    x = torch.randn(4, 3)
    good, bad = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 9, 3])
    for _ in range(2):
        fs.sigmoid_focal_loss(x, good)
        with pytest.raises(ValueError, match="9"):
            fs.sigmoid_focal_loss(x, bad)


def test_saved_denominators_belong_to_their_own_call(backend):
    # Two losses, then their backwards in the other order, with the weight's
    # gradient (which reads the saved denominator): a denominator of the
    # shape alone (PyTorch's mean) may be shared by a plan's calls; one of a
    # weight's values (TF's mean of a single weight) may not.
    x, z = torch.randn(3, 5), torch.rand(3, 5)
    cases = [
        (lambda w: fs.binary_cross_entropy_with_logits(x, z, w), lambda s: torch.full((5,), s)),
        (lambda w: fs.sigmoid_cross_entropy(z, x, weights=w, reduction=fs.Reduction.MEAN),
         lambda s: torch.full((1, 1), s)),
    ]
    for fn, weight in cases:
        ws = [weight(s).requires_grad_() for s in (0.5, 2.0)]
        losses = [fn(w) for w in ws]
        for loss in reversed(losses):
            loss.backward()
        for w in ws:
            w_ref = w.detach().requires_grad_()
            on_reference(fn, w_ref).backward()
            assert_close(w.grad, w_ref.grad)


def test_a_dead_functorch_wrapper_takes_the_op_route(backend):
    x, z = torch.randn(3, 4), torch.rand(3, 4)
    fs.binary_cross_entropy_with_logits(x, z)
    leaked = []
    torch.func.grad(lambda t: leaked.append(t) or t.sum())(x)
    assert_close(fs.binary_cross_entropy_with_logits(leaked[0], z), fs.binary_cross_entropy_with_logits(x, z))


def test_an_option_equal_to_a_planned_one_but_of_another_class_is_checked(backend):
    # True == 1.0 and hash alike, but a bool is no smoothing, gamma or weight.
    from decimal import Decimal

    x, z = torch.randn(3, 4), torch.rand(3, 4)
    fs.binary_cross_entropy_with_logits(x, z, label_smoothing=0.0)
    fs.binary_cross_entropy_with_logits(x, z, label_smoothing=0.5)
    fs.sigmoid_focal_loss(x, z, gamma=1.0)
    fs.sigmoid_cross_entropy(z, x, weights=1.0)
    for _ in range(2):
        for bad in [False, Decimal("0.5"), 0.5 + 0j]:
            with pytest.raises(TypeError, match="label_smoothing"):
                fs.binary_cross_entropy_with_logits(x, z, label_smoothing=bad)
        with pytest.raises(TypeError, match="gamma"):
            fs.sigmoid_focal_loss(x, z, gamma=True)
        with pytest.raises((TypeError, ValueError), match="weights"):
            fs.sigmoid_cross_entropy(z, x, weights=True)


def test_a_backend_changed_before_the_backward_is_read_there(backend, monkeypatch):
    x, z = torch.randn(3, 4, requires_grad=True), torch.rand(3, 4)
    fs.binary_cross_entropy_with_logits(x, z).backward()
    loss = fs.binary_cross_entropy_with_logits(x, z)
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        loss.backward()


def test_calls_no_kept_plan_serves_still_take_the_plain_function(backend):
    # Converted arguments (an integer weight, a number) get a plan of their
    # own call: the Function's C++ apply, not the op route's Python prelude.
    x, z = torch.randn(3, 4, requires_grad=True), torch.rand(3, 4)
    for _ in range(2):
        losses = [fs.binary_cross_entropy_with_logits(x, z, torch.arange(4)),
                  fs.weighted_cross_entropy_with_logits(labels=z, logits=x, pos_weight=2.0).sum(),
                  fs.sigmoid_focal_loss(x, torch.tensor([0, 1, 4]), reduction="sum")]
        for loss in losses:
            grad_fn = loss.grad_fn if loss.grad_fn.__class__.__name__.startswith("Planned") else \
                loss.grad_fn.next_functions[0][0]
            assert grad_fn.__class__.__name__ == "PlannedCEBackward"
    assert _plans_made() == []
