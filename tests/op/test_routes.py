"""Which route a call takes (`fused_sigxent/op/routes.py`): plain eager code
calls the implementation directly; anything that could observe or transform
the call sees the registered op."""

import pytest
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


def _route_taken(monkeypatch) -> list:
    """The names of the routes taken from now on, in order."""
    taken = []
    rows = []
    for r in routes.ROUTES:
        rows.append(r._replace(run=lambda args, key, given, r=r: taken.append(r.name) or r.run(args, key, given)))
    monkeypatch.setattr(routes, "ROUTES", tuple(rows))
    return taken


def test_each_route_is_taken_where_the_table_says(monkeypatch):
    # The first row whose test holds runs the call; a kept plan skips the table.
    taken = _route_taken(monkeypatch)
    x, z = _inputs()
    fs.binary_cross_entropy_with_logits(x, z)
    fs.binary_cross_entropy_with_logits(x, z)  # the kept call plan: no row asked
    assert taken == ["planned"]
    with OpNames():
        fs.binary_cross_entropy_with_logits(x, z)
    assert taken[-1] == "observed"
    with pytest.raises(RuntimeError, match="TorchScript"):
        torch.jit.trace(lambda t: fs.binary_cross_entropy_with_logits(t, z), (x.detach(),))
    assert taken[-1] == "refused"
    # A torch.func transform inside a compiled graph (as the route's test sees it): the plain ops.
    monkeypatch.setattr(routes, "_compiled_transform", lambda: True)
    assert_close(fs.binary_cross_entropy_with_logits(x, z, reduction="sum").detach(),
                 torch.nn.functional.binary_cross_entropy_with_logits(x, z, reduction="sum").detach())
    assert taken[-1] == "plain_ops"
    # DTensor arguments: the sharded route, which refuses plain logits by name.
    monkeypatch.setattr(routes, "_compiled_transform", lambda: False)
    monkeypatch.setattr(routes, "is_dtensor", lambda *tensors: True)
    with pytest.raises(NotImplementedError, match="logits"):
        fs.binary_cross_entropy_with_logits(x, z, label_smoothing=0.2)  # (a signature no plan kept)
    assert taken[-1] == "sharded"


@pytest.mark.parametrize("backend_name,route", [("auto", "compiled_cpu"), ("reference", "compiled")])
def test_compiled_graphs_take_the_compiled_routes(monkeypatch, backend_name, route):
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", backend_name)
    taken = _route_taken(monkeypatch)
    x, z = _inputs()
    loss = torch.compile(lambda a, b: fs.binary_cross_entropy_with_logits(a, b), backend="eager", fullgraph=True)(x, z)
    loss.backward()
    assert taken == [route]
    assert_close(x.grad, torch.autograd.grad(torch.nn.functional.binary_cross_entropy_with_logits(x, z), x)[0])
