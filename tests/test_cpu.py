"""The CPU path (`fused_sigxent/_cpu.py`, what `auto` runs on CPU tensors):
against float64 math and the reference, across piece boundaries, at the
limits, in bounded memory, and fused by Inductor under torch.compile."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fused_sigxent as fs
from conftest import assert_close, oracle_elementwise, oracle_reduce
from fused_sigxent import _cpu, _op, _reference
from fused_sigxent import _reduction as R

# As in test_kernels: one element, ragged 1-D, an odd prime width, one row
# past a power of two, a width of 1, rank 3 with a broadcast middle dimension.
SHAPES = [(1,), (1000,), (3, 1031), (1, 1025), (129, 1), (2, 5, 77)]
REDUCTIONS = {R.NONE: "none", R.SUM: "sum", R.MEAN_BY_WEIGHTS: "mean", R.MEAN_BY_NUMEL: "numel",
              R.MEAN_BY_NONZERO: "nonzero", R.TORCH_MEAN: "torch_mean"}


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "auto")
    # Pieces of 257 elements (a prime): every shape above spans several,
    # with a ragged last one, at a test's size.
    monkeypatch.setattr(_cpu, "PIECE", 257)


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
def test_every_reduction_and_coefficient_against_float64(poisoned, shape, dtype):
    for reduction, name in REDUCTIONS.items():
        for w_kind, p_kind, s in [(None, None, 0.0), ("class", "class", 0.1), ("full", None, 0.3),
                                  ("scalar", "full", 0.2)]:
            where = f"{name}, weight {w_kind}, pos_weight {p_kind}, smoothing {s}"
            x = (torch.randn(shape) * 5).to(dtype).requires_grad_()
            z = torch.rand(shape).to(dtype).requires_grad_()
            w, p = _coefficient(shape, w_kind), _coefficient(shape, p_kind)
            loss = _op.sigmoid_ce(x, z, w, p, s, reduction, dtype)
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
def test_label_dtypes_against_reference(label_dtype, monkeypatch):
    x = torch.randn(3, 1031).to(torch.bfloat16).requires_grad_()
    z = (torch.rand(3, 1031) > 0.5).to(label_dtype)
    results = []
    for backend in ("auto", "reference"):
        monkeypatch.setenv("FUSED_SIGXENT_BACKEND", backend)
        loss = fs.binary_cross_entropy_with_logits(x, z, pos_weight=torch.rand(1031) + 0.5, label_smoothing=0.1)
        results.append((loss, *torch.autograd.grad(loss, x)))
    for a, b in zip(*results):
        assert_close(a, b)


def test_limits_nan_and_masking_match_the_reference(monkeypatch):
    # Pieces holding an infinite logit or a NaN fall back to the reference's
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


def test_peak_memory_is_the_gradient_plus_pieces():
    # 16M float32 elements (64 MiB per tensor). PyTorch eager holds ~128 MiB
    # above the inputs for a training step's loss and ~128 MiB for a
    # forward under no_grad; here a step holds the gradient it hands to
    # autograd (64 MiB) and a forward only pieces.
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
    # Compiled with `auto` on CPU tensors, the graph holds plain ops (which
    # Inductor fuses), not the opaque op; values and gradients as eager.
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(6, 11, requires_grad=True)
    z, p = torch.rand(6, 11), torch.rand(11) + 0.5
    step = torch.compile(lambda x: fs.binary_cross_entropy_with_logits(x, z, pos_weight=p, label_smoothing=0.1),
                         backend=backend, fullgraph=True)
    loss = step(x)
    (g,) = torch.autograd.grad(loss, x)
    assert not any("fused_sigxent" in str(node.target) for gm in graphs for node in gm.graph.nodes)
    smoothed = z * 0.9 + 0.05
    expected = F.binary_cross_entropy_with_logits(x, smoothed, pos_weight=p)
    assert_close(loss, expected)
    assert_close(g, torch.autograd.grad(expected, x)[0])


def test_opcheck_on_the_cpu_path():
    # The registrations hold for the CPU path as for the other two
    # (test_op.py runs the same checks through `reference` and `triton`).
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
