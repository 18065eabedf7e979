"""Which route a call takes (`fused_sigxent/op/routes.py`): plain eager code
calls the implementation directly; anything that could observe or transform
the call sees the registered op."""

import torch

import fused_sigxent as fs
from fused_sigxent.op import routes

from conftest import OpNames, assert_close


def _inputs():
    return torch.randn(5, 7, requires_grad=True), torch.rand(5, 7)


def test_plain_eager_tensors_skip_the_dispatcher():
    x, z = _inputs()
    assert routes.unobserved(None, (x, z, None, torch.nn.Parameter(torch.rand(7))))


def test_anything_that_observes_the_call_sees_the_op():
    x, z = _inputs()
    args = (x, z)
    with OpNames():
        assert not routes.unobserved(None, args)
    with torch.device("cpu"):  # a torch function mode
        assert not routes.unobserved(None, args)
    with torch.autograd.profiler.profile():
        assert not routes.unobserved(None, args)
    assert not routes.unobserved(None, (x.to("meta").as_subclass(_Subclass), z))  # a tensor subclass
    assert not torch.func.grad(lambda t: torch.tensor(float(routes.unobserved(None, (t,)))) * t.sum())(x[0, 0].detach())


class _Subclass(torch.Tensor):
    pass


def test_a_dispatch_mode_records_both_ops(backend):
    x, z = _inputs()
    mode = OpNames()
    with mode:
        fs.binary_cross_entropy_with_logits(x, z, reduction="none").sum().backward()
    assert "fused_sigxent.sigmoid_ce_fwd.default" in mode.names
    assert "fused_sigxent.sigmoid_ce_bwd.default" in mode.names


def test_the_profiler_names_the_ops(backend):
    x, z = _inputs()
    with torch.autograd.profiler.profile() as prof:
        fs.binary_cross_entropy_with_logits(x, z).backward(torch.tensor(3.0))
    names = {e.name for e in prof.function_events}
    assert {"fused_sigxent::sigmoid_ce_fwd", "fused_sigxent::sigmoid_ce_scale_"} <= names


def test_both_routes_give_the_same_loss_and_gradient(backend):
    x, z = _inputs()
    w = torch.rand(7)
    fs.binary_cross_entropy_with_logits(x, z, w, label_smoothing=0.1).backward(torch.tensor(0.5))
    direct, x.grad = x.grad, None
    with OpNames():
        loss = fs.binary_cross_entropy_with_logits(x, z, w, label_smoothing=0.1)
        loss.backward(torch.tensor(0.5))
    assert_close(x.grad, direct)
    assert_close(loss.detach(), fs.binary_cross_entropy_with_logits(x.detach(), z, w, label_smoothing=0.1))
