"""The CPU path (`fused_sigxent/impl/cpu.py`, what `auto` runs on CPU tensors):
against float64 math and the reference, across tile boundaries, at the
limits, in bounded memory, and fused by Inductor under torch.compile."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fused_sigxent as fs
from conftest import aot_graphs, assert_close, oracle_elementwise, oracle_reduce, torchvision_focal
from fused_sigxent.impl import cpu as _cpu
from fused_sigxent.impl import cpu_loop as _cpu_loop
from fused_sigxent.op import routes
from fused_sigxent.impl import reference as _reference
from fused_sigxent.core import reduction as R

# As in test_kernels: one element, ragged 1-D, an odd prime width, one row
# past a power of two, a width of 1, rank 3 with a broadcast middle dimension.
SHAPES = [(1,), (1000,), (3, 1031), (1, 1025), (129, 1), (2, 5, 77)]
REDUCTIONS = {R.NONE: "none", R.SUM: "sum", R.MEAN_BY_WEIGHTS: "mean", R.MEAN_BY_NUMEL: "numel",
              R.MEAN_BY_NONZERO: "nonzero", R.TORCH_MEAN: "torch_mean"}


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "auto")
    # Tiles of 257 elements (a prime): every shape above spans several,
    # with a ragged last one, at a test's size.
    monkeypatch.setattr(_cpu, "TILE", 257)


@pytest.fixture(params=["loop", "tiles"])
def impl(request, monkeypatch):
    """The cross entropy's two CPU implementations: the compiled loop (built
    on every machine with a C++ compiler, CI's included) and the ATen tiles
    that run where none is."""
    if request.param == "loop":
        assert _cpu_loop.library() is not None
    else:
        monkeypatch.setattr(_cpu_loop, "library", lambda: None)
    return request.param


@pytest.fixture
def tiles(monkeypatch):
    monkeypatch.setattr(_cpu_loop, "library", lambda: None)


def _coefficient(shape, kind):
    if kind is None:
        return None
    if kind == "scalar":
        return torch.tensor(0.75)
    if kind == "class":
        return torch.rand(shape[-1]) + 0.1
    w = torch.rand(shape)
    w[w < 0.2] = 0  # zeros: the nonzero count differs from numel
    return w


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_every_reduction_and_coefficient_against_float64(poisoned, shape, dtype, impl):
    for reduction, name in REDUCTIONS.items():
        for w_kind, p_kind, s in [(None, None, 0.0), ("class", "class", 0.1), ("full", None, 0.3),
                                  ("scalar", "full", 0.2)]:
            where = f"{name}, weight {w_kind}, pos_weight {p_kind}, smoothing {s}"
            x = (torch.randn(shape) * 5).to(dtype).requires_grad_()
            z = torch.rand(shape).to(dtype).requires_grad_()
            w, p = _coefficient(shape, w_kind), _coefficient(shape, p_kind)
            loss = routes.sigmoid_ce(x, z, w, p, s, reduction, dtype)
            xd, zd = x.double().detach().requires_grad_(), z.double().detach().requires_grad_()
            expected = oracle_reduce(oracle_elementwise(xd, zd, p, s), w, name)
            assert_close(loss, expected, dtype, msg=where)
            grad = torch.randn(loss.shape, dtype=torch.float64)
            got = torch.autograd.grad(loss, (x, z), grad.to(dtype))
            for g, e in zip(got, torch.autograd.grad(expected, (xd, zd), grad)):
                assert_close(g, e, dtype, msg=where)


def test_the_cpu_path_is_what_auto_runs(monkeypatch):
    calls = []
    for name in ("sigmoid_ce_fwd", "sigmoid_ce_bwd"):
        fn = getattr(_cpu, name)
        monkeypatch.setattr(_cpu, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    x = torch.randn(4, 9, requires_grad=True)
    fs.binary_cross_entropy_with_logits(x, torch.rand(4, 9), reduction="none").sum().backward()
    assert calls == ["sigmoid_ce_fwd", "sigmoid_ce_bwd"]


@pytest.mark.parametrize("label_dtype", [torch.bool, torch.uint8, torch.float16])
def test_label_dtypes_against_reference(label_dtype, monkeypatch, impl):
    x = torch.randn(3, 1031).to(torch.bfloat16).requires_grad_()
    z = (torch.rand(3, 1031) > 0.5).to(label_dtype)
    results = []
    for backend in ("auto", "reference"):
        monkeypatch.setenv("FUSED_SIGXENT_BACKEND", backend)
        loss = fs.binary_cross_entropy_with_logits(x, z, pos_weight=torch.rand(1031) + 0.5, label_smoothing=0.1)
        results.append((loss, *torch.autograd.grad(loss, x)))
    for a, b in zip(*results):
        assert_close(a, b)


def test_limits_nan_and_masking_match_the_reference(monkeypatch, impl):
    # Tiles holding an infinite logit or a NaN fall back to the reference's
    # masked formulas; the others stay on the fast ones.
    x = torch.randn(4, 300) * 3
    x[0, :6] = torch.tensor([float("inf"), float("inf"), float("-inf"), float("-inf"), 30.0, -30.0])
    x[1, 7] = float("nan")
    z = torch.rand(4, 300)
    z[0, :6] = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    w = torch.rand(4, 300)
    w[1, 7] = 0.0  # a zero weight masks even a NaN logit
    w[2, :10] = 0.0
    results = []
    for backend in ("auto", "reference"):
        monkeypatch.setenv("FUSED_SIGXENT_BACKEND", backend)
        xs = x.clone().requires_grad_()
        for reduction in ["none", "sum"]:
            loss = fs.binary_cross_entropy_with_logits(xs, z, w, reduction, pos_weight=w[0] + 0.5)
            (g,) = torch.autograd.grad(loss.sum(), xs)
            results.append((loss, g))
    half = len(results) // 2
    for (a, ga), (b, gb) in zip(results[:half], results[half:]):
        assert_close(a, b)
        assert_close(ga, gb)
    assert torch.isfinite(results[0][0][2:]).all() and results[0][0][1, 7] == 0


def _peak_above_inputs(code: str) -> int:
    """Peak resident memory of `code`'s measured part, in a fresh process
    (VmHWM reset after a warm-up; small frees returned to the OS)."""
    script = textwrap.dedent("""
        import re, torch, fused_sigxent as fs
        torch.manual_seed(0)
        def rss(field):
            return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
        x = torch.randn(4096, 4096, requires_grad=True); z = torch.rand(4096, 4096)
        def run():
    """) + textwrap.indent(textwrap.dedent(code), " " * 12) + textwrap.dedent("""
        run(); x.grad = None
        base = rss("VmRSS"); open("/proc/self/clear_refs", "w").write("5")
        run()
        print(rss("VmHWM") - base)
    """)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", FUSED_SIGXENT_BACKEND="auto", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_peak_memory_is_the_gradient_plus_tiles():
    # 16M float32 elements (64 MiB per tensor). PyTorch eager holds ~128 MiB
    # above the inputs for a training step's loss and ~128 MiB for a
    # forward under no_grad; here a step holds the gradient it hands to
    # autograd (64 MiB) and a forward only tiles.
    mib = 1 << 20
    forward = _peak_above_inputs("""
        with torch.no_grad():
            fs.binary_cross_entropy_with_logits(x, z)
    """)
    step = _peak_above_inputs("""
        fs.binary_cross_entropy_with_logits(x, z).backward()
    """)
    assert forward < 16 * mib, forward / mib
    assert step < 64 * mib + 16 * mib, step / mib


def test_compiled_on_cpu_inductor_sees_the_math():
    # Compiled with `auto` on CPU tensors, the forward and backward graphs
    # that Inductor gets hold plain ops, not the opaque op; the backward is
    # the gradient's formula (one exp, one reciprocal: `_reference.sigmoids`),
    # not autograd's derivative of the loss (its log1p, relus and masks).
    # Values and gradients as eager.
    torch._dynamo.reset()
    backend, nodes = aot_graphs()
    x = torch.randn(6, 11, requires_grad=True)
    z, p = torch.rand(6, 11), torch.rand(11) + 0.5
    step = torch.compile(lambda x: fs.binary_cross_entropy_with_logits(x, z, pos_weight=p, label_smoothing=0.1),
                         backend=backend, fullgraph=True)
    loss = step(x)
    (g,) = torch.autograd.grad(loss, x)
    graphs = {kind: [str(node.target) for node in found] for kind, found in nodes.items()}
    assert not any("fused_sigxent" in target for targets in graphs.values() for target in targets)
    assert graphs["bwd"].count("aten.exp.default") == 1, graphs["bwd"]
    assert graphs["bwd"].count("aten.reciprocal.default") == 1, graphs["bwd"]
    assert not {"aten.log1p.default", "aten.sign.default", "aten.abs.default"} & set(graphs["bwd"]), graphs["bwd"]
    smoothed = z * 0.9 + 0.05
    expected = F.binary_cross_entropy_with_logits(x, smoothed, pos_weight=p)
    assert_close(loss, expected)
    assert_close(g, torch.autograd.grad(expected, x)[0])


@pytest.mark.parametrize("front_end", ["torch mean", "torch none", "tf MEAN", "tf SUM_BY_NONZERO_WEIGHTS",
                                       "tf zero weights"])
def test_compiled_on_cpu_keeps_every_semantic(front_end):
    # The compiled CPU route (`_traced.TracedCE`) against the eager op, loss
    # and all four gradients: +-inf logits with agreeing and disagreeing
    # labels, a NaN logit under a zero weight, TF's reductions and their
    # no-NaN division (every weight zero: loss and gradients 0).
    x = torch.randn(4, 7) * 3
    x[0, :4] = torch.tensor([float("inf"), float("inf"), -float("inf"), -float("inf")])
    z = torch.rand(4, 7)
    z[0, :4] = torch.tensor([1.0, 0.0, 0.0, 1.0])
    w, p = torch.rand(4, 7) + 0.1, torch.rand(7) + 0.5
    w[2, 3], x[2, 3] = 0.0, float("nan")
    if front_end == "tf zero weights":
        w.zero_()

    def loss(x, z, w, p):
        if front_end.startswith("torch"):
            out = fs.binary_cross_entropy_with_logits(x, z, w, front_end.split()[1], p, label_smoothing=0.1)
            return out.sum() if front_end == "torch none" else out
        reduction = fs.Reduction.MEAN if front_end == "tf MEAN" else fs.Reduction.SUM_BY_NONZERO_WEIGHTS
        return fs.sigmoid_cross_entropy(z, x, w, 0.1, reduction)

    results = []
    for f in (loss, torch.compile(loss, fullgraph=True)):
        torch._dynamo.reset()
        leaves = [t.clone().requires_grad_() for t in (x, z, w, p)]
        value = f(*leaves)
        grads = torch.autograd.grad(value, [t for t in leaves if t is not leaves[3] or front_end.startswith("torch")],
                                    allow_unused=True)
        results.append((value, *grads))
    for got, want in zip(results[1], results[0]):
        if want is None:
            assert got is None
            continue
        assert_close(got, want)
    if front_end == "tf zero weights":  # the loss and the logits and labels gradients
        assert all(torch.count_nonzero(t) == 0 for t in results[1][:3]), results[1][:3]


def test_opcheck_on_the_cpu_path(impl):
    # The registrations hold for the CPU path as for the other two
    # (op/test_registry.py runs the same checks through `reference` and `triton`).
    ops = torch.ops.fused_sigxent
    x, z = torch.randn(3, 5, requires_grad=True), torch.rand(3, 5, requires_grad=True)
    w, p = torch.rand(1, 5, requires_grad=True), (torch.rand(5) + 0.5).requires_grad_()
    s = torch.tensor(0.1)
    for reduction in R.CODES:
        torch.library.opcheck(ops.sigmoid_ce_fwd, (x, z, w, p, s, reduction, torch.float32, False, False))
        grad = torch.randn(3, 5) if reduction == R.NONE else torch.tensor(0.7)
        torch.library.opcheck(ops.sigmoid_ce_bwd, (grad, x.detach(), z.detach(), w.detach(), p.detach(),
                                                   torch.tensor(4.0), s, reduction, True, True))
    torch.library.opcheck(ops.sigmoid_ce_scale_, (torch.tensor(2.0), torch.randn(3, 5), torch.randn(3, 5)))


def _case(shape, dtype=torch.float32, label_dtype=None, smoothing=0.1, weight="class", pos_weight="class"):
    """Inputs for `_cpu`'s functions called directly (the op's arguments)."""
    x = torch.randn(shape).to(dtype) * 4
    z = torch.rand(shape)
    z = (z > 0.5).to(label_dtype) if label_dtype in (torch.bool, torch.uint8) else z.to(label_dtype or dtype)
    return x, z, _coefficient(shape, weight), _coefficient(shape, pos_weight), torch.tensor(smoothing)


def test_finite_inputs_take_only_the_fast_formulas(tiles, monkeypatch):
    # The reference's masked formulas are the fallback for a tile the fast
    # ones get wrong; finite inputs never need it, and an infinite logit
    # sends only its own tile there (tiles of 257 elements: 12 here).
    fallbacks = []
    reference_tile = _cpu._reference_tile
    monkeypatch.setattr(_cpu, "_reference_tile", lambda *a: fallbacks.append(a[0].shape) or reference_tile(*a))
    x, z, w, p, s = _case((3, 1031), weight="full")
    x.view(-1)[700] = float("inf")
    for reduction in R.CODES:
        fallbacks.clear()
        _cpu.sigmoid_ce_fwd(x.clamp(-50, 50), z, w, p, s, reduction, torch.float32, True, True)
        assert fallbacks == [], reduction
        _cpu.sigmoid_ce_fwd(x, z, w, p, s, reduction, torch.float32, True, True)
        assert len(fallbacks) == 1, (reduction, fallbacks)


@pytest.mark.parametrize("reduction", [R.NONE, R.SUM, R.MEAN_BY_WEIGHTS, R.TORCH_MEAN])
@pytest.mark.parametrize("label_dtype", [torch.float32, torch.bool])
def test_limits_nan_and_masking_in_every_output(reduction, label_dtype, monkeypatch, impl):
    # Infinite logits (each sign, labels agreeing and not), a NaN logit and a
    # NaN label masked by zero weights: the loss and the gradients of both
    # the forward-written and the recomputed (backward) kind equal the
    # reference's, and masked elements give exactly 0.
    x, z, _, _, s = _case((4, 300), label_dtype=label_dtype)
    x[0, :6] = torch.tensor([float("inf"), float("inf"), float("-inf"), float("-inf"), 1e4, -1e4])
    z[0, :6] = torch.tensor([1, 0, 0, 1, 1, 0]).to(z.dtype)
    x[1, 7] = float("nan")
    w = torch.rand(4, 300)
    w[1, 7] = 0.0
    w[2, :10] = 0.0
    if label_dtype.is_floating_point:
        z[3, 3] = float("nan")
        w[3, 3] = 0.0
    p = torch.rand(300) + 0.5
    grad = torch.randn(4, 300) if reduction == R.NONE else torch.tensor(0.7)
    need_labels = label_dtype.is_floating_point
    for fn in (_cpu, _reference):
        fwd = fn.sigmoid_ce_fwd(x, z, w, p, s, reduction, torch.float32, True, need_labels)
        bwd = fn.sigmoid_ce_bwd(grad, x, z, w, p, fwd[1], s, reduction, True, need_labels)
        if fn is _cpu:
            ours = fwd, bwd
    for a, b in zip((*ours[0], *ours[1]), (*fwd, *bwd)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_close(a, b, torch.float32)
    loss, _, grad_logits, _ = ours[0]
    if reduction == R.NONE:
        assert loss[1, 7] == 0 and (loss[2, :10] == 0).all() and torch.isfinite(loss[1:]).all()
    assert grad_logits[1, 7] == 0 and ours[1][0][1, 7] == 0
    assert torch.isfinite(ours[1][0]).all()


@pytest.mark.parametrize("shape", [(), (0,), (0, 5), (1,), (7,)])
def test_zero_dim_empty_and_tiny(shape, impl):
    # 0-d and empty tensors (PyTorch's mean of nothing is NaN, TF's 0) and
    # tiny ones, against the reference.
    x, z = torch.randn(shape) * 3, torch.rand(shape)
    w, p, s = torch.tensor(0.5), torch.tensor(1.5), torch.tensor(0.2)
    for reduction in R.CODES:
        fwd = [f.sigmoid_ce_fwd(x, z, w, p, s, reduction, torch.float32, True, True) for f in (_cpu, _reference)]
        grad = torch.randn(shape) if reduction == R.NONE else torch.tensor(1.3)
        bwd = [f.sigmoid_ce_bwd(grad, x, z, w, p, fwd[1][1], s, reduction, True, True) for f in (_cpu, _reference)]
        for a, b in zip((*fwd[0], *bwd[0]), (*fwd[1], *bwd[1])):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert_close(a, b)


@pytest.mark.parametrize("label_dtype", [torch.bool, torch.uint8, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("reduction", [R.NONE, R.MEAN_BY_NONZERO, R.TORCH_MEAN])
def test_bf16_logits_any_labels_against_float64(label_dtype, reduction, poisoned, impl):
    # bf16 logits with hard labels (read as bool/uint8) or soft ones, every
    # feature: float32 math, so only the output's rounding differs from
    # float64 math. Poisoned allocations: every output element is written.
    x, z, w, p, s = _case((5, 1031), torch.bfloat16, label_dtype, weight="full")
    loss, denom, gx, _ = _cpu.sigmoid_ce_fwd(x, z, w, p, s, reduction, torch.bfloat16, reduction != R.NONE, False)
    assert loss.dtype == torch.bfloat16
    xd = x.double().requires_grad_()
    name = {R.NONE: "none", R.MEAN_BY_NONZERO: "nonzero", R.TORCH_MEAN: "torch_mean"}[reduction]
    expected = oracle_reduce(oracle_elementwise(xd, z.double(), p, 0.1), w, name)
    assert_close(loss, expected, torch.bfloat16)
    grad = torch.randn(loss.shape, dtype=torch.float64)
    (expected_gx,) = torch.autograd.grad(expected, xd, grad)
    if reduction == R.NONE:
        gx, _ = _cpu.sigmoid_ce_bwd(grad.bfloat16(), x, z, w, p, denom, s, reduction, True, False)
    else:
        _cpu.sigmoid_ce_scale_(grad.float(), gx, torch.empty(0))
    assert gx.dtype == torch.bfloat16
    assert_close(gx, expected_gx, torch.bfloat16)


def test_scale_by_one_is_skipped_and_other_factors_round_once(impl):
    g = torch.randn(3, 7).bfloat16()
    before = g.clone()
    _cpu.sigmoid_ce_scale_(torch.tensor(1.0), g, torch.empty(0))
    assert torch.equal(g, before)
    _cpu.sigmoid_ce_scale_(torch.tensor(0.3), g, torch.empty(0))
    assert torch.equal(g, (before.float() * 0.3).bfloat16())


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of every new storage an op makes (not views, not out= or in place)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.sizes.append(t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("shape,weight", [((64, 1031), "class"), ((40000,), None), ((64, 1031), "scalar")])
@pytest.mark.parametrize("dtype,label_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.uint8)])
def test_temporaries_are_tile_sized(shape, weight, dtype, label_dtype, impl):
    # Besides its outputs, a call allocates only buffers of a tile's size
    # (TILE = 257 elements here; a tile of whole rows when coefficients
    # vary: one row of 1031), in float32, and the loop none: the CPU path's
    # bound on memory.
    tile = 1031 if weight == "class" else 257
    x, z, w, p, s = _case(shape, dtype, label_dtype, weight=weight, pos_weight=weight)
    for reduction in (R.NONE, R.TORCH_MEAN):
        with _Allocations() as fwd_allocs:
            outs = _cpu.sigmoid_ce_fwd(x, z, w, p, s, reduction, dtype, reduction != R.NONE, False)
        grad = torch.randn(shape).to(dtype) if reduction == R.NONE else torch.tensor(2.0)
        with _Allocations() as bwd_allocs:
            outs += _cpu.sigmoid_ce_bwd(grad, x, z, w, p, outs[1], s, reduction, True, False)
        outputs = sorted(t.untyped_storage().nbytes() for t in outs if t.numel() > 1)
        temporaries = sorted(fwd_allocs.sizes + bwd_allocs.sizes)[: len(fwd_allocs.sizes + bwd_allocs.sizes)
                                                                  - len(outputs)]
        assert sorted(fwd_allocs.sizes + bwd_allocs.sizes)[-len(outputs):] == outputs
        # The loop reads every dtype as it is: nothing beyond 0-d scalars.
        assert max(temporaries) <= (tile * 4 if impl == "tiles" else 8), (reduction, temporaries)


@pytest.mark.parametrize("gamma,alpha", [(0.5, None), (1.0, 0.25), (2.0, 0.75), (5.0, None)])
@pytest.mark.parametrize("dtype,label_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.uint8),
                                               (torch.float64, torch.float64), (torch.float32, torch.bool)])
def test_focal_tiles_against_float64(poisoned, gamma, alpha, dtype, label_dtype):
    # The focal loss's own fast formulas, across tiles, for every output the
    # front end asks for, with weights of every layout and smoothing.
    # The op's 0-d arguments come in the compute dtype (`routes.scalar_arguments`).
    ct = _reference.compute_dtype(dtype)
    g = torch.tensor(gamma, dtype=ct)
    a = None if alpha is None else torch.tensor(alpha, dtype=ct)
    for reduction, name in [(R.NONE, "none"), (R.SUM, "sum"), (R.TORCH_MEAN, "torch_mean")]:
        for w_kind, s in [(None, 0.0), ("class", 0.1), ("full", 0.0)]:
            where = f"{name}, weight {w_kind}, smoothing {s}"
            x, z, w, _, _ = _case((3, 1031), dtype, label_dtype, s, w_kind, None)
            x.requires_grad_()
            loss = routes.sigmoid_ce(x, z, w, None, s, reduction, dtype, gamma=gamma, alpha=alpha)
            xd = x.double().detach().requires_grad_()
            expected = oracle_reduce(torchvision_focal(xd, z, -1.0 if alpha is None else alpha, gamma,
                                                        label_smoothing=s), w, name)
            assert_close(loss, expected, dtype, msg=where)
            grad = torch.randn(loss.shape, dtype=torch.float64)
            (gx,) = torch.autograd.grad(loss, x, grad.to(loss.dtype))
            (want,) = torch.autograd.grad(expected, xd, grad)
            assert_close(gx, want, dtype, msg=where)
            # Called as the op does (forward and backward), against the reference.
            for in_fwd in (False, True):
                got = _cpu.sigmoid_ce_fwd(x.detach(), z, w, None, torch.tensor(s, dtype=ct), reduction, dtype,
                                          in_fwd, False, g, a)
                ref = _reference.sigmoid_ce_fwd(x.detach(), z, w, None, torch.tensor(s, dtype=ct), reduction, dtype,
                                                in_fwd, False, g, a)
                for u, v in zip(got, ref):
                    assert u.shape == v.shape and u.dtype == v.dtype, where
                    assert_close(u, v, dtype, msg=where)
            got = _cpu.sigmoid_ce_bwd(grad.to(dtype), x.detach(), z, w, None, ref[1], torch.tensor(s, dtype=ct),
                                      reduction, True, False, g, a)
            ref = _reference.sigmoid_ce_bwd(grad.to(dtype), x.detach(), z, w, None, ref[1], torch.tensor(s, dtype=ct),
                                            reduction, True, False, g, a)
            assert_close(got[0], ref[0], dtype, msg=where)


def test_focal_takes_the_fast_formulas_until_they_fail(monkeypatch):
    # Finite ordinary logits never reach the reference; where 1 - p_t
    # underflows to 0 (a confident logit, gamma < 1: pow's derivative is inf
    # there) or a logit is infinite, that tile alone is redone by it, and
    # the result is the reference's: finite gradients, the limits.
    fallbacks = []
    reference_tile = _cpu._reference_tile
    monkeypatch.setattr(_cpu, "_reference_tile",
                        lambda *a, **k: fallbacks.append(a[0].shape) or reference_tile(*a, **k))
    x, z, _, _, _ = _case((3, 1031), label_dtype=torch.uint8, weight=None, pos_weight=None)
    g, a = torch.tensor(0.5), torch.tensor(0.25)
    _cpu.sigmoid_ce_fwd(x.clamp(-30, 30), z, None, None, torch.tensor(0.0), R.NONE, torch.float32, False, False, g, a)
    assert fallbacks == []
    # (the loss alone is exact at 1e4: F = 0^gamma and l = 0 need no ratio)
    for extreme, loss_fallbacks in ((1e4, 0), (float("inf"), 1)):
        fallbacks.clear()
        y = x.clone()
        y.view(-1)[700] = extreme if z.view(-1)[700] else -extreme
        y.view(-1)[701] = extreme if not z.view(-1)[701] else -extreme
        got = _cpu.sigmoid_ce_fwd(y, z, None, None, torch.tensor(0.0), R.NONE, torch.float32, False, False, g, a)
        ref = _reference.sigmoid_ce_fwd(y, z, None, None, torch.tensor(0.0), R.NONE, torch.float32, False, False,
                                        g, a)
        assert len(fallbacks) == loss_fallbacks, (extreme, fallbacks)
        assert_close(got[0], ref[0])
        gx, _ = _cpu.sigmoid_ce_bwd(torch.ones_like(y), y, z, None, None, got[1], torch.tensor(0.0), R.NONE,
                                    True, False, g, a)
        assert gx.isfinite().all() and len(fallbacks) == loss_fallbacks + 1
        assert_close(gx, _reference.sigmoid_ce_bwd(torch.ones_like(y), y, z, None, None, got[1], torch.tensor(0.0),
                                                   R.NONE, True, False, g, a)[0])


def test_focal_nan_in_nan_out_and_zero_weight_masks():
    x = torch.tensor([[float("nan"), 1.0, -float("inf"), 2.0]], requires_grad=True)
    z = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    w = torch.tensor([1.0, 1.0, 0.0, 1.0])
    loss = fs.sigmoid_focal_loss(x, z, reduction="none", weight=w)
    assert loss[0, 0].isnan() and loss[0, 1:].isfinite().all() and loss[0, 2] == 0
    (gx,) = torch.autograd.grad(loss[0, 1:].sum(), x)
    assert gx[0, 2] == 0 and gx[0, 1:].isfinite().all()


def test_focal_variants_the_tiles_leave_to_the_reference(monkeypatch):
    # pos_weight and a labels gradient: the reference's (class indices: tiles).
    seen = []
    ref_fwd = _reference.sigmoid_ce_fwd
    monkeypatch.setattr(_reference, "sigmoid_ce_fwd", lambda *a, **k: seen.append(a) or ref_fwd(*a, **k))
    x, z, _, p, s = _case((3, 13), weight=None)
    g = torch.tensor(2.0)
    _cpu.sigmoid_ce_fwd(x, z, None, None, s, R.SUM, torch.float32, True, False, g, None)
    assert seen == []
    _cpu.sigmoid_ce_fwd(x, z, None, p, s, R.SUM, torch.float32, True, False, g, None)
    _cpu.sigmoid_ce_fwd(x, z, None, None, s, R.SUM, torch.float32, True, True, g, None)
    assert len(seen) == 2
    _cpu.sigmoid_ce_fwd(x, torch.tensor([0, 13, 2]), None, None, s, R.SUM, torch.float32, True, False, g, None)
    assert len(seen) == 2


@pytest.mark.parametrize("reduction", [R.SUM, R.TORCH_MEAN, R.NONE])
def test_focal_gradient_in_the_forward_falls_back_where_its_ratio_fails(reduction):
    # A confidently right logit (|x| >= ~104: 1 - p_t underflows) gives a
    # finite loss but a 0/0 ratio in dF/dx: the tile goes to the reference
    # also when the forward writes the gradient (a training step's mean).
    x = torch.tensor([[200.0, -200.0, 1e4, 3.0], [-1e4, 0.5, -2.0, 150.0]], requires_grad=True)
    z = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.3, 1.0]])
    for gamma in (0.5, 2.0):
        loss = routes.sigmoid_ce(x, z, None, None, 0.0, reduction, torch.float32, gamma=gamma, alpha=0.25)
        (gx,) = torch.autograd.grad(loss.sum(), x)
        xd = x.double().detach().requires_grad_()
        expected = oracle_reduce(_reference.pointwise(xd, z.double(), None, (torch.tensor(gamma, dtype=torch.float64),
                                                                         torch.tensor(0.25, dtype=torch.float64)))["l"],
                                 None, REDUCTIONS[reduction])
        (want,) = torch.autograd.grad(expected.sum(), xd)
        assert gx.isfinite().all(), gx
        assert_close(loss, expected, torch.float32)
        assert_close(gx, want, torch.float32)


def test_focal_loss_of_confident_logits_is_relatively_accurate():
    # l = relu(x) - z' x + log1p(exp(-|x|)): where a hard label agrees with
    # |x| = 17 or 30 the loss is ~1e-8 or ~1e-13, kept to float32's relative
    # precision (not rounded to 0), and so is the gradient that scales with it.
    x = torch.tensor([17.0, -17.0, 30.0, -30.0], requires_grad=True)
    z = torch.tensor([1.0, 0.0, 1.0, 0.0])
    loss = routes.sigmoid_ce(x, z, None, None, 0.0, R.NONE, torch.float32, gamma=0.5, alpha=0.25)
    (gx,) = torch.autograd.grad(loss.sum(), x)
    xd = x.double().detach().requires_grad_()
    # (the reference's log-space formula in float64: torchvision's own loses
    # ~1e-3 to cancellation in 1 - p_t here, even in float64)
    focal = (torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64))
    want = _reference.pointwise(xd, z.double(), None, focal)["l"]
    (want_gx,) = torch.autograd.grad(want.sum(), xd)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(gx.double(), want_gx, rtol=1e-5, atol=0)


def test_reduced_loss_beyond_float32_range_is_inf(impl):
    # Each tile's sum is finite, their float64 total is not a float32.
    x = torch.full((1 << 12,), -1e36)
    z = torch.ones(1 << 12)
    loss, *_ = _cpu.sigmoid_ce_fwd(x, z, None, None, torch.tensor(0.0), R.SUM, torch.float32, False, False)
    assert loss == float("inf")


@pytest.mark.parametrize("focal", [False, True])
def test_class_indices_in_tiles_never_dense(focal):
    # int64 class indices (-1 and C: no positive; outside [-1, C]: that
    # row's loss NaN) become one-hot rows a tile at a time: agreement with the
    # reference in every output, and no temporary of the whole (N, C).
    shape, tile_rows = (40, 13), 257 // 13
    x = torch.randn(shape) * 4
    index = torch.randint(0, 14, shape[:-1])
    index[[3, 30, 31]] = torch.tensor([-2, 14, -1])
    extra = (torch.tensor(2.0), torch.tensor(0.25), True) if focal else ()
    s = torch.tensor(0.1)
    for reduction in (R.NONE, R.SUM, R.TORCH_MEAN):
        with _Allocations() as allocs:
            got = _cpu.sigmoid_ce_fwd(x, index, None, None, s, reduction, torch.float32, reduction != R.NONE, False,
                                      *extra)
        want = _reference.sigmoid_ce_fwd(x, index, None, None, s, reduction, torch.float32, reduction != R.NONE,
                                         False, *extra)
        for u, v in zip(got, want):
            assert u.shape == v.shape and u.dtype == v.dtype
            assert_close(u, v, torch.float32)
        # the only allocations of the whole's size are the outputs (the
        # elementwise loss, or the gradient written ahead); the rest are a
        # tile's rows at most
        full_size_outputs = sum(t.numel() == x.numel() for t in got)
        assert sorted(allocs.sizes)[-full_size_outputs - 1] <= tile_rows * 13 * 4 < x.numel() * 4, allocs.sizes
        assert sorted(allocs.sizes)[-full_size_outputs:] == [x.numel() * 4] * full_size_outputs, allocs.sizes
        if reduction == R.NONE:
            grad = torch.randn(shape)
            (gx, _), (want_gx, _) = (f(grad, x, index, None, None, got[1], s, reduction, True, False, *extra)
                                     for f in (_cpu.sigmoid_ce_bwd, _reference.sigmoid_ce_bwd))
            assert_close(gx, want_gx)
        assert got[0].isnan().any() and not got[0].isnan().all() if reduction == R.NONE else got[0].isnan()


def test_focal_labels_outside_the_unit_interval_are_the_references():
    # Section 2 allows such labels; the focal factor's 1 - p_t is then
    # negative, which the reference's log space makes NaN. The tiles' pow
    # would give a number for an integer gamma: such tiles take the reference.
    x = torch.randn(4, 7)
    for labels in (torch.full((4, 7), 2.0), torch.full((4, 7), -0.5)):
        z = torch.rand(4, 7)
        z[1:3] = labels[1:3]
        for gamma in (2.0, 0.5):
            g, a = torch.tensor(gamma), torch.tensor(0.25)
            for reduction in (R.NONE, R.SUM):
                got = _cpu.sigmoid_ce_fwd(x, z, None, None, torch.tensor(0.0), reduction, torch.float32, True, False,
                                          g, a)
                want = _reference.sigmoid_ce_fwd(x, z, None, None, torch.tensor(0.0), reduction, torch.float32, True,
                                                 False, g, a)
                assert want[0].isnan().any()
                for u, v in zip(got, want):
                    assert_close(u, v, torch.float32)


def test_class_index_of_1d_logits_longer_than_a_tile():
    # 1-D logits are one row of C classes and a 0-d index: slicing them into
    # tiles would slice the classes (each tile a one-hot of its own).
    x = torch.randn(1000) * 3
    for index in (torch.tensor(3), torch.tensor(700), torch.tensor(1000), torch.tensor(1001)):
        for reduction in (R.NONE, R.SUM):
            got = _cpu.sigmoid_ce_fwd(x, index, None, None, torch.tensor(0.0), reduction, torch.float32, False, False)
            want = _reference.sigmoid_ce_fwd(x, index, None, None, torch.tensor(0.0), reduction, torch.float32,
                                             False, False)
            assert_close(got[0], want[0])
