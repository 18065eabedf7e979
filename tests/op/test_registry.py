"""The torch.library ops: registration (opcheck), the implementation protocol,
autograd, torch.compile, autocast and the backend switch."""

import inspect

import pytest
import torch

import fused_sigxent as fs
from conftest import aot_graphs, assert_close, oracle_elementwise, oracle_reduce
from fused_sigxent.op import derivatives
from fused_sigxent.op import routes
from fused_sigxent.core import reduction as R

OPS = torch.ops.fused_sigxent


def _inputs():
    x = torch.randn(3, 5, requires_grad=True)
    z = torch.rand(3, 5, requires_grad=True)
    w = torch.rand(1, 5, requires_grad=True)
    p = (torch.rand(5) + 0.5).requires_grad_()
    return x, z, w, p


@pytest.mark.parametrize("reduction", R.CODES)
def test_opcheck_forward(backend, reduction):
    x, z, w, p = _inputs()
    static = R.denominator_is_static(reduction, w.numel())
    for in_fwd in ([False, True] if static and reduction != R.NONE else [False]):
        args = (x, z, w, p, torch.tensor(0.1), reduction, torch.float32, in_fwd, in_fwd)
        # The AOT-dispatch checks return every output of the op, so the
        # gradient the forward wrote is both a graph output and scaled in
        # place by the backward, which AOTAutograd cannot partition. Real use
        # never returns it (the front ends return the loss only), and
        # test_compiled_training_step compiles exactly that.
        utils = ("test_schema", "test_autograd_registration", "test_faketensor") if in_fwd else None
        torch.library.opcheck(OPS.sigmoid_ce_fwd, args, test_utils=utils or torch.library._OPCHECK_DEFAULT_UTILS)


def test_opcheck_backward_and_scale(backend):
    x, z, w, p = [t.detach() for t in _inputs()]
    for reduction in R.CODES:
        grad = torch.randn(x.shape) if reduction == R.NONE else torch.tensor(0.7)
        args = (grad, x, z, w, p, torch.tensor(4.0), torch.tensor(0.2), reduction, True, True)
        torch.library.opcheck(OPS.sigmoid_ce_bwd, args)
    torch.library.opcheck(OPS.sigmoid_ce_scale_, (torch.tensor(2.0), torch.randn(3, 5), torch.randn(3, 5)))
    torch.library.opcheck(OPS.sigmoid_ce_scale_, (torch.tensor(1.0), torch.randn(3, 5), torch.empty(0)))


@pytest.mark.parametrize("reduction", list(fs.Reduction)[:5])
def test_learned_weight_and_pos_weight_gradients(backend, reduction):
    # Gradients for weights and pos_weight (TF gives them; PyTorch refuses),
    # against float64 autograd through the definition.
    x = torch.randn(4, 6, dtype=torch.float64)
    z = torch.rand(4, 6, dtype=torch.float64)
    w = torch.rand(1, 6, dtype=torch.float64, requires_grad=True)
    p = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    code = R.TF_CODES[reduction]
    loss = routes.sigmoid_ce(x, z, w, p, 0.1, code, torch.float64)
    name = {R.NONE: "none", R.SUM: "sum", R.MEAN_BY_WEIGHTS: "mean", R.MEAN_BY_NUMEL: "numel",
            R.MEAN_BY_NONZERO: "nonzero"}[code]
    expected = oracle_reduce(oracle_elementwise(x, z, p, 0.1), w, name)
    grad = torch.randn(loss.shape, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(loss, (w, p), grad), torch.autograd.grad(expected, (w, p), grad)):
        assert_close(got, want)


@pytest.mark.parametrize("reduction", [R.SUM, R.TORCH_MEAN, R.MEAN_BY_WEIGHTS, R.NONE])
def test_gradient_in_forward_plan(reduction):
    x, z, w, _ = _inputs()
    planned = derivatives.grads_in_forward(x, z, None, reduction)
    assert planned == ((False, False) if reduction == R.NONE else (True, True))
    # A full weight makes MEAN's denominator data-dependent: recompute instead.
    assert derivatives.grads_in_forward(x, z, w, R.MEAN_BY_WEIGHTS) == (False, False)
    assert derivatives.grads_in_forward(x, z.detach(), w, R.SUM) == (True, False)
    with torch.no_grad():
        assert derivatives.grads_in_forward(x, z, None, reduction) == (False, False)


def test_compiled_graph_recomputes_instead_of_scaling_a_saved_gradient(monkeypatch):
    # Under torch.compile an in-place scale of the forward-written gradient
    # becomes a functional op and Inductor copies the saved gradient first: a
    # pass the recompute does not need. The compiled forward writes no
    # gradient; the backward is one recompute op, nothing functionalized.
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "triton")
    backend, graphs = aot_graphs()
    x = torch.randn(5, 7, requires_grad=True)
    z = (torch.rand(5, 7) > 0.5).to(torch.uint8)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, z: fs.binary_cross_entropy_with_logits(x, z, label_smoothing=0.1),
                             backend=backend, fullgraph=True)
    compiled(x, z).backward()
    (fwd,) = [n for n in graphs["fwd"] if n.target is torch.ops.fused_sigxent.sigmoid_ce_fwd.default]
    assert fwd.args[7:9] == (False, False)  # grad_logits_in_fwd, grad_labels_in_fwd
    targets = [str(n.target) for n in graphs["bwd"]]
    assert sum("sigmoid_ce_bwd" in t for t in targets) == 1, targets
    assert not any("auto_functionalized" in t or "sigmoid_ce_scale" in t for t in targets), targets
    expected = (torch.sigmoid(x.detach()) - (z * 0.9 + 0.05)) / x.numel()
    assert_close(x.grad, expected)


def test_second_backward_through_a_retained_graph(backend):
    # The forward-written gradient is scaled in place once; a second backward
    # (retain_graph, as gradcheck does) recomputes rather than scaling twice.
    x = torch.randn(3, 5, requires_grad=True)
    z = torch.rand(3, 5)
    loss = fs.binary_cross_entropy_with_logits(x, z)
    (first,) = torch.autograd.grad(loss, x, torch.tensor(3.0), retain_graph=True)
    (second,) = torch.autograd.grad(loss, x, torch.tensor(3.0))
    expected = (torch.sigmoid(x) - z).detach() * 3.0 / x.numel()
    assert_close(first, expected)
    assert_close(second, expected)


FRONT_ENDS = {
    "binary_cross_entropy_with_logits": lambda y, z, w: fs.binary_cross_entropy_with_logits(
        y, z, w[:1], pos_weight=w[0, :1] + 1, label_smoothing=0.1),
    "BCEWithLogitsLoss": lambda y, z, w: fs.BCEWithLogitsLoss(reduction="sum")(y, z),
    "sigmoid_cross_entropy": lambda y, z, w: fs.sigmoid_cross_entropy(z, y, w[:, 0], 0.2, fs.Reduction.MEAN),
    "sigmoid_cross_entropy default": lambda y, z, w: fs.sigmoid_cross_entropy(z, y),
    "sigmoid_cross_entropy_with_logits": lambda y, z, w: fs.sigmoid_cross_entropy_with_logits(
        labels=z, logits=y).mean(),
    "deprecated_flipped": lambda y, z, w: fs.deprecated_flipped_sigmoid_cross_entropy_with_logits(y, z).sum(),
    "weighted_cross_entropy_with_logits": lambda y, z, w: fs.weighted_cross_entropy_with_logits(
        labels=z, logits=y, pos_weight=w[:1]).mean(),
    "numbers as weights": lambda y, z, w: fs.weighted_cross_entropy_with_logits(
        labels=z, logits=y, pos_weight=3.0).mean() + fs.sigmoid_cross_entropy(z, y, 2.0),
}


@pytest.mark.parametrize("front_end", list(FRONT_ENDS))
def test_compiled_training_step(backend, front_end):
    # A small model whose forward ends in the loss, compiled whole: no graph
    # break, and the eager loss and parameter gradients at three batch sizes.
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6))
    loss_fn = FRONT_ENDS[front_end]

    def step(inputs, labels, weights):
        return loss_fn(model(inputs), labels, weights)

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for batch in [3, 8, 13]:
        inputs, labels, weights = torch.randn(batch, 8), torch.rand(batch, 6), torch.rand(batch, 6)
        results = []
        for fn in (step, compiled):
            model.zero_grad()
            loss = fn(inputs, labels, weights)
            loss.backward()
            results.append((loss.detach(), [q.grad.clone() for q in model.parameters()]))
        (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
        assert_close(compiled_loss, eager_loss)
        for a, b in zip(compiled_grads, eager_grads):
            assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_returns_float32_like_pytorch(backend, dtype):
    x = torch.randn(4, 9).to(dtype).requires_grad_()
    z = torch.rand(4, 9)
    with torch.autocast("cpu", dtype=dtype):
        ours = fs.binary_cross_entropy_with_logits(x, z)
        theirs = torch.nn.functional.binary_cross_entropy_with_logits(x, z)
        elementwise = fs.sigmoid_cross_entropy_with_logits(labels=z, logits=x)
    assert ours.dtype == theirs.dtype == elementwise.dtype == torch.float32
    assert_close(ours, theirs)
    (gx,) = torch.autograd.grad(ours, x)
    (gt,) = torch.autograd.grad(theirs, x)
    assert gx.dtype == dtype
    assert_close(gx, gt, dtype)


def test_backend_is_read_at_call_time(monkeypatch, launches):
    x, z = torch.randn(2, 3), torch.rand(2, 3)
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "reference")
    fs.binary_cross_entropy_with_logits(x, z)
    assert launches == {}
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "triton")
    fs.binary_cross_entropy_with_logits(x, z)
    assert launches == {"_sigmoid_ce_fwd_kernel": 1}
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "auto")
    fs.binary_cross_entropy_with_logits(x, z)
    assert launches == {"_sigmoid_ce_fwd_kernel": 1}  # CPU tensors: reference path


def test_no_host_reads_on_the_hot_path(backend, monkeypatch):
    # The structural half of "no host synchronization": with every way of
    # reading a tensor's value on the host disabled, forward and backward of
    # every front end still run (the GPU half, under set_sync_debug_mode,
    # is in test_gpu.py).
    x = torch.randn(3, 40, requires_grad=True)
    z, w = torch.rand(3, 40, requires_grad=True), torch.rand(40)
    calls = [
        lambda: fs.binary_cross_entropy_with_logits(x, z, w, pos_weight=w, label_smoothing=0.1),
        lambda: fs.BCEWithLogitsLoss(reduction="sum")(x, z),
        lambda: fs.sigmoid_cross_entropy(z, x, w[None], 0.1, fs.Reduction.MEAN),
        lambda: fs.sigmoid_cross_entropy(z, x, 2.0),
        lambda: fs.sigmoid_cross_entropy_with_logits(labels=z, logits=x).sum(),
        lambda: fs.deprecated_flipped_sigmoid_cross_entropy_with_logits(x, z).mean(),
        lambda: fs.weighted_cross_entropy_with_logits(labels=z, logits=x, pos_weight=3.0).sum(),
    ]
    for call in calls:  # warm-up: first calls may allocate workspaces
        call().backward()

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    for name in ["item", "tolist", "__bool__", "__float__", "__int__", "__index__"]:
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for call in calls:
        call().backward(torch.tensor(1.5))


def test_gradcheck_front_ends(backend):
    # float64 gradcheck through the public functions and the chosen backend:
    # logits, soft labels, a learned weight and pos_weight.
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    z = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(1, 5, dtype=torch.float64) + 0.1).requires_grad_()
    p = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
    for reduction in ["none", "sum", "mean"]:
        assert torch.autograd.gradcheck(
            lambda x, z, w, p: fs.binary_cross_entropy_with_logits(x, z, w, reduction, p, label_smoothing=0.1),
            (x, z, w, p))
    for reduction in [fs.Reduction.MEAN, fs.Reduction.SUM_BY_NONZERO_WEIGHTS]:
        assert torch.autograd.gradcheck(lambda x, z, w: fs.sigmoid_cross_entropy(z, x, w, 0.2, reduction), (x, z, w))
    assert torch.autograd.gradcheck(
        lambda x, z, p: fs.weighted_cross_entropy_with_logits(labels=z, logits=x, pos_weight=p), (x, z, p))


def _parameters(fn, skip_self=False) -> list[tuple]:
    """(name, kind, default) of each parameter: what a caller relies on (the
    annotations may be wider, a float smoothing on the reference)."""
    params = list(inspect.signature(fn).parameters.values())[1 if skip_self else 0:]
    return [(p.name, p.kind, p.default) for p in params]


@pytest.mark.parametrize("name", ["sigmoid_ce_fwd", "sigmoid_ce_bwd", "sigmoid_ce_scale_"])
def test_every_implementation_follows_the_protocol(name):
    # One protocol (impl.Implementation) for the reference, the CPU path and
    # the kernels; the op's schema is the protocol less grad_logits_out,
    # which only callers inside an op's implementation pass.
    from fused_sigxent import impl
    from fused_sigxent.impl import cpu, reference
    from fused_sigxent.kernels import sigmoid_ce_bwd, sigmoid_ce_fwd, sigmoid_ce_scale

    kernels = {"sigmoid_ce_fwd": sigmoid_ce_fwd, "sigmoid_ce_bwd": sigmoid_ce_bwd,
               "sigmoid_ce_scale_": sigmoid_ce_scale}[name]
    protocol = _parameters(getattr(impl.Implementation, name), skip_self=True)
    for module in (reference, cpu, kernels):
        assert _parameters(getattr(module, name)) == protocol, module.__name__
    schema = [a.name for a in getattr(OPS, name).default._schema.arguments]
    assert schema == [n for n, _, _ in protocol if n != "grad_logits_out"]
