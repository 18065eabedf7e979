"""Derivatives off the beaten path (`fused_sigxent/op/derivatives.py`): double
backward, forward-mode AD, torch.func transforms and vmap, hooks, a smoothing
schedule under torch.compile, and TorchScript refused by name. Every value is
checked in float64 against PyTorch's own loss (or, for TF's reductions, the
float64 definition in conftest), through both backends."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, grad_and_value, hessian, jacfwd, jacrev, jvp, vjp, vmap

import fused_sigxent as fs
from conftest import assert_close, oracle_elementwise, oracle_reduce, second_derivatives

D = torch.float64
SMOOTHING = 0.1


def _inputs(shape=(4, 5)):
    # (4, 5): small enough for float64 Jacobians and Hessians under the
    # interpreter; the class weight broadcasts over rows.
    x = torch.randn(shape, dtype=D) * 2
    z = torch.rand(shape, dtype=D)
    w = torch.rand(shape[-1], dtype=D) + 0.1
    p = torch.rand(shape[-1], dtype=D) + 0.5
    return x, z, w, p


def ours(x, z, w, p, reduction):
    return fs.binary_cross_entropy_with_logits(x, z, w, reduction, p, label_smoothing=SMOOTHING)


def theirs(x, z, w, p, reduction):
    smoothed = z * (1 - SMOOTHING) + 0.5 * SMOOTHING
    return F.binary_cross_entropy_with_logits(x, smoothed, w, reduction=reduction, pos_weight=p)


TF_REDUCTIONS = {fs.Reduction.SUM: "sum", fs.Reduction.MEAN: "mean",
                 fs.Reduction.SUM_OVER_BATCH_SIZE: "numel", fs.Reduction.SUM_BY_NONZERO_WEIGHTS: "nonzero"}


def ours_tf(x, z, w, reduction):
    return fs.sigmoid_cross_entropy(z, x, w[None], SMOOTHING, reduction)


def theirs_tf(x, z, w, reduction):
    return oracle_reduce(oracle_elementwise(x, z, None, SMOOTHING), w[None], TF_REDUCTIONS[reduction])


def _scalar(f, reduction):
    """f as a scalar function, so that grad/hessian apply to every reduction."""
    return (lambda *a: f(*a, reduction).sum()) if reduction == "none" else (lambda *a: f(*a, reduction))


def _gradients(route, f, inputs):
    """(dL/dx, dL/dz, dL/dw, dL/dp) of the scalar loss f, by one route; for
    "double backward", conftest's `second_derivatives`."""
    if route == "torch.func":
        return grad(f, argnums=(0, 1, 2, 3))(*inputs)
    if route == "compiled torch.func":
        torch._dynamo.reset()
        return torch.compile(grad(f, argnums=(0, 1, 2, 3)), fullgraph=True)(*inputs)
    leaves = [t.clone().requires_grad_() for t in inputs]
    if route == "compiled":
        torch._dynamo.reset()
        return torch.autograd.grad(torch.compile(f, fullgraph=True)(*leaves), leaves)
    if route == "double backward":
        return second_derivatives(f, leaves)
    return torch.autograd.grad(f(*leaves), leaves)


@pytest.mark.parametrize("backend_name, route", [
    ("auto", "backward"), ("auto", "compiled"), ("auto", "compiled torch.func"),
    ("reference", "backward"), ("reference", "double backward"), ("reference", "torch.func"),
    ("triton", "backward"), ("triton", "double backward"), ("triton", "torch.func"),
])
def test_seams_on_every_route(backend_name, route, monkeypatch):
    # Exact zero logits (a zero-initialized head), hard labels and a zero
    # weight are where the formulas' pieces meet (relu and |x| at 0, the
    # masked products at a zero factor). The plain-ops routes (create_graph,
    # torch.func, DTensor, a compiled graph on CPU tensors) let autograd
    # differentiate them there; relu's and abs's derivatives at 0 are 0, and
    # a compiled step once got a logits gradient of 0 at x = 0, not 1/2 - z.
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", backend_name)
    x, z, w, p = _inputs()
    x.view(-1)[::2] = 0
    z.view(-1)[1::4], z.view(-1)[3::4] = 0.0, 1.0
    w[1] = 0
    got = _gradients(route, lambda x, z, w, p: fs.binary_cross_entropy_with_logits(x, z, w, "mean", p),
                     (x, z, w, p))
    # PyTorch's loss has no weight gradient: the float64 definition, smooth everywhere.
    want = _gradients("double backward" if route == "double backward" else "backward",
                      lambda x, z, w, p: (w * oracle_elementwise(x, z, p)).mean(), (x, z, w, p))
    for g, t, name in zip(got, want, "xzwp"):
        assert_close(g, t, msg=f"d/d{name}")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_double_backward_matches_pytorch(backend, reduction):
    # The case: a gradient penalty on top of the loss. "mean" and
    # "sum" are where the forward writes the gradient.
    results, inputs = [], _inputs()
    for f in (ours, theirs):
        x, z, w, p = (t.clone() for t in inputs)
        x.requires_grad_()
        loss = _scalar(f, reduction)(x, z, w, p)
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        assert g.requires_grad
        (loss + (g ** 2).sum()).backward()
        results.append((loss.detach(), x.grad))
    for a, b in zip(*results):
        assert_close(a, b)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_gradcheck_and_gradgradcheck_in_every_mode(backend, reduction):
    # Reverse, forward, batched (vmap over the backward and over jvp),
    # forward-over-reverse and reverse-over-reverse, for every input.
    x, z, w, p = (t.requires_grad_() for t in _inputs((3, 4)))
    f = lambda *a: ours(*a, reduction)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, z, w, p), check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)
    assert torch.autograd.gradgradcheck(f, (x, z, w, p), check_fwd_over_rev=True, check_batched_grad=True)


@pytest.mark.parametrize("reduction", list(TF_REDUCTIONS))
def test_gradgradcheck_tf_reductions(backend, reduction):
    # MEAN's denominator is the weights' sum: its second derivative in w counts.
    x, z, w, _ = (t.requires_grad_() for t in _inputs((3, 4)))
    assert torch.autograd.gradgradcheck(lambda x, z, w: ours_tf(x, z, w, reduction), (x, z, w))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_hessian_vector_products_match_pytorch(backend, reduction):
    x, z, w, p = _inputs()
    v = torch.randn_like(x)
    for via in ("double backward", "forward over reverse"):
        got, want = [
            torch.autograd.functional.hvp(lambda x: _scalar(f, reduction)(x, z, w, p), x, v)[1]
            if via == "double backward" else
            jvp(grad(lambda x: _scalar(f, reduction)(x, z, w, p)), (x,), (v,))[1]
            for f in (ours, theirs)
        ]
        assert_close(got, want, msg=via)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_forward_mode_matches_pytorch(backend, reduction):
    primals = _inputs()
    tangents = tuple(torch.randn_like(t) for t in primals)
    # Every input's tangent at once, then each alone: none may be dropped.
    for which in [(0, 1, 2, 3), (0,), (1,), (2,), (3,)]:
        t = tuple(tangents[i] if i in which else torch.zeros_like(tangents[i]) for i in range(4))
        (value, tangent), (value_t, tangent_t) = [
            jvp(lambda *a: f(*a, reduction), primals, t) for f in (ours, theirs)]
        assert_close(value, value_t)
        assert_close(tangent, tangent_t, msg=f"tangents of inputs {which}")
    # The same through torch.autograd.forward_ad's dual tensors.
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        duals = [fwAD.make_dual(a, b) for a, b in zip(primals, tangents)]
        tangent = fwAD.unpack_dual(ours(*duals, reduction)).tangent
    assert tangent is not None
    assert_close(tangent, jvp(lambda *a: theirs(*a, reduction), primals, tangents)[1])


@pytest.mark.parametrize("reduction", list(TF_REDUCTIONS))
def test_forward_mode_tf_reductions(backend, reduction):
    primals = _inputs()[:3]
    tangents = tuple(torch.randn_like(t) for t in primals)
    got = jvp(lambda *a: ours_tf(*a, reduction), primals, tangents)[1]
    want = jvp(lambda *a: theirs_tf(*a, reduction), primals, tangents)[1]
    assert_close(got, want)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_jacobians_match_pytorch(backend, reduction):
    x, z, w, p = _inputs()
    for transform in (jacfwd, jacrev):
        got = transform(lambda *a: ours(*a, reduction), argnums=(0, 1, 2, 3))(x, z, w, p)
        want = transform(lambda *a: theirs(*a, reduction), argnums=(0, 1, 2, 3))(x, z, w, p)
        for a, b in zip(got, want):
            assert_close(a, b, msg=transform.__name__)
    got = jacrev(lambda x: ours(x, z, w, p, "none"))(x)
    assert_close(got, jacrev(lambda x: theirs(x, z, w, p, "none"))(x))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_batched_incoming_gradients(backend, reduction):
    # torch.autograd.functional.jacobian(vectorize=True) runs one backward
    # with a batch of incoming gradients (vmap over the backward).
    x, z, w, p = _inputs((3, 4))
    got, want = [torch.autograd.functional.jacobian(lambda x: f(x, z, w, p, reduction), x, vectorize=True)
                 for f in (ours, theirs)]
    assert_close(got, want)
    x.requires_grad_()
    loss = ours(x, z, w, p, reduction)
    cotangents = torch.randn(5, *loss.shape, dtype=D)
    (batched,) = torch.autograd.grad(loss, x, cotangents, is_grads_batched=True)
    for k in range(5):
        assert_close(batched[k], torch.autograd.grad(theirs(x, z, w, p, reduction), x, cotangents[k])[0])


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reverse_transforms_match_pytorch(backend, reduction):
    x, z, w, p = _inputs()
    args = (0, 1, 2, 3)
    fo, ft = _scalar(ours, reduction), _scalar(theirs, reduction)
    for a, b in zip(grad(fo, argnums=args)(x, z, w, p), grad(ft, argnums=args)(x, z, w, p)):
        assert_close(a, b)
    (ga, va), (gb, vb) = grad_and_value(fo)(x, z, w, p), grad_and_value(ft)(x, z, w, p)
    assert_close(ga, gb)
    assert_close(va, vb)
    out_a, fn_a = vjp(lambda *a: ours(*a, reduction), x, z, w, p)
    out_b, fn_b = vjp(lambda *a: theirs(*a, reduction), x, z, w, p)
    cotangent = torch.randn_like(out_b)
    assert_close(out_a, out_b)
    for a, b in zip(fn_a(cotangent), fn_b(cotangent)):
        assert_close(a, b)
    assert_close(hessian(fo)(x, z, w, p), hessian(ft)(x, z, w, p))


@pytest.fixture
def no_vmap_fallback():
    # PyTorch loops over the batch, one op call per sample, where an op has no
    # batching rule; turned off, that loop is an error instead of a warning.
    torch._C._functorch._set_vmap_fallback_enabled(False)
    yield
    torch._C._functorch._set_vmap_fallback_enabled(True)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_vmap_batches_in_one_op_call(backend, reduction, no_vmap_fallback, launches, monkeypatch):
    from fused_sigxent.impl import reference as _reference

    calls = []
    fwd = _reference.sigmoid_ce_fwd
    monkeypatch.setattr(_reference, "sigmoid_ce_fwd", lambda *a: calls.append(1) or fwd(*a))
    x, z, w, p = _inputs((6, 4, 5))
    per_sample_weight = torch.rand(6, 5, dtype=D)
    cases = [
        ((0, 0, None, None), (x, z, w[0], p[0])),
        ((0, 0, 0, None), (x, z, per_sample_weight, p[0])),
        ((0, None, None, 0), (x, z[0], w[0], per_sample_weight)),
    ]
    for in_dims, args in cases:
        calls.clear()
        launches.clear()
        got = vmap(lambda *a: ours(*a, reduction), in_dims=in_dims)(*args)
        want = vmap(lambda *a: theirs(*a, reduction), in_dims=in_dims)(*args)
        assert_close(got, want)
        assert len(calls) + launches.get("_sigmoid_ce_fwd_kernel", 0) == 1


def test_vmap_of_tf_reductions(backend, no_vmap_fallback):
    x, z, w, _ = _inputs((6, 4, 5))
    for reduction in TF_REDUCTIONS:
        got = vmap(lambda x, z: ours_tf(x, z, w, reduction))(x, z)
        want = torch.stack([theirs_tf(x[i], z[i], w, reduction) for i in range(6)])
        assert_close(got, want, msg=str(reduction))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_per_sample_gradients(backend, reduction):
    # vmap(grad(...)): the per-sample gradients of DP-SGD style training.
    model = torch.nn.Linear(3, 5).double()
    params = dict(model.named_parameters())
    inputs, labels = torch.randn(7, 3, dtype=D), torch.rand(7, 5, dtype=D)

    def per_sample(f):
        def loss(params, x, z):
            logits = torch.func.functional_call(model, params, (x,))
            return f(logits, z, None, None, reduction)
        return vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, labels)

    got, want = per_sample(ours), per_sample(theirs)
    for name in params:
        assert_close(got[name], want[name], msg=name)


def test_hook_that_edits_the_gradient_then_a_second_backward(backend):
    # The forward-written gradient is handed to autograd once; a hook may then
    # change it in place, and a retained graph's second backward recomputes.
    results, inputs = [], _inputs()
    for f in (ours, theirs):
        x, z, w, p = (t.clone() for t in inputs)
        x.requires_grad_()
        x.register_hook(lambda g: g.mul_(2))
        loss = f(x, z, w, p, "mean")
        loss.backward(retain_graph=True)
        first = x.grad.clone()
        loss.backward(torch.tensor(3.0, dtype=D))
        results.append((first, x.grad))
    for a, b in zip(*results):
        assert_close(a, b)


def test_smoothing_schedule_compiles_at_most_twice(backend):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    x, z = torch.randn(4, 5, requires_grad=True), torch.rand(4, 5)
    step = torch.compile(lambda x, z, s: fs.binary_cross_entropy_with_logits(x, z, label_smoothing=s),
                         backend=counter, fullgraph=True)
    for s in [0.01 * k for k in range(1, 13)]:
        loss = step(x, z, s)
        assert_close(loss, F.binary_cross_entropy_with_logits(x, z * (1 - s) + 0.5 * s))
    assert counter.frame_count <= 2


def test_smoothing_schedule_on_a_module_compiles_at_most_twice(backend):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    criterion, model = fs.BCEWithLogitsLoss(), torch.nn.Linear(3, 5)
    step = torch.compile(lambda x, z: criterion(model(x), z), backend=counter, fullgraph=True)
    x, z = torch.randn(4, 3), torch.rand(4, 5)
    for k in range(12):
        criterion.label_smoothing = 0.02 * k
        loss = step(x, z)
        assert_close(loss, F.binary_cross_entropy_with_logits(model(x), z * (1 - 0.02 * k) + 0.01 * k))
    assert counter.frame_count <= 2


def test_compiled_second_backward_through_a_retained_graph(backend):
    # The compiled graph scales the forward-written gradient; a second
    # backward must not scale it twice.
    results, x0, z = [], torch.randn(4, 5), torch.rand(4, 5)
    for f in (fs.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits):
        torch._dynamo.reset()
        step = torch.compile(lambda x: f(x, z), fullgraph=True)
        x = x0.clone().requires_grad_()
        loss = step(x)
        loss.backward(torch.tensor(2.0), retain_graph=True)
        first = x.grad.clone()
        loss.backward(torch.tensor(3.0))
        results.append((first, x.grad))
    for a, b in zip(*results):
        assert_close(a, b)


@pytest.mark.parametrize("transform", ["grad", "jvp", "vmap"])
def test_torch_func_inside_a_compiled_function(backend, transform):
    # Compiled, the op is called directly; a custom op has no forward-mode
    # formula, so a transform there must take the plain-ops route, not give
    # a zero tangent.
    x, z, w, p = _inputs()
    v = torch.randn_like(x)
    apply = {
        "grad": lambda f: grad(lambda x: f(x, z, w, p, "mean")),
        "jvp": lambda f: lambda x: jvp(lambda x: f(x, z, w, p, "mean"), (x,), (v,))[1],
        "vmap": lambda f: vmap(lambda x: f(x, z[0], w, p, "mean")),
    }[transform]
    torch._dynamo.reset()
    assert_close(torch.compile(apply(ours), fullgraph=True)(x), apply(theirs)(x))


def test_smoothing_out_of_range_under_compile_is_an_error(backend):
    torch._dynamo.reset()
    step = torch.compile(lambda x, z, s: fs.binary_cross_entropy_with_logits(x, z, label_smoothing=s),
                         fullgraph=True)
    x, z = torch.randn(4, 5), torch.rand(4, 5)
    step(x, z, 0.1)
    step(x, z, 0.2)  # now traced as a symbol: checked at run time
    with pytest.raises(Exception, match="label_smoothing must be in"):
        step(x, z, 1.5)


def test_torchscript_is_refused_by_name(backend):
    model = fs.BCEWithLogitsLoss()
    x, z = torch.randn(4, 5), torch.rand(4, 5)
    with pytest.raises(RuntimeError, match="TorchScript"):
        torch.jit.trace(model, (x, z))
