"""fs.linear_sigmoid_cross_entropy and the chunked engine (fused_sigxent/impl/chunked.py)
against the unfused composition in float64, on both backends."""

import math

import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fused_sigxent as fs
from conftest import oracle_elementwise
from fused_sigxent.core import reduction as R
from fused_sigxent.impl import chunked

# Float64 everywhere: the engine's only differences from the composition are
# summation order (chunks, then tiles), so 1e-10 relative is plenty.
F64 = dict(rtol=1e-10, atol=1e-12)
TARGETS = ["float", "bool", "uint8", "int64_1", "int64_k"]
# 1: every row its own chunk; 3: odd, with a ragged last chunk (B = 7);
# 100: larger than B (one chunk); None: the size heuristic.
CHUNKS = [1, 3, 100, None]
# (bias, pos_weight, label_smoothing, reduction): every feature on and off
# at least once per target kind and chunk size.
FEATURES = [(True, False, 0.0, "mean"), (False, True, 0.1, "sum"), (True, True, 0.2, "mean"),
            (False, False, 0.0, "sum")]


@pytest.fixture(params=["reference", "auto"])
def cpu_backend(request, monkeypatch):
    """The per-chunk loss through the reference, and through the CPU path (auto)."""
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", request.param)
    return request.param


def make_case(kind, B=7, H=5, C=11, K=4, dtype=torch.float64, lead=()):
    """(input, weight, bias, pos_weight, target as the op takes it, the dense
    float64 labels it means). Sparse rows carry -1 padding, C (background:
    no positive either) and a duplicate; one row has no positive at all."""
    x = torch.randn(*lead, B, H, dtype=dtype)
    w = torch.randn(C, H, dtype=dtype)
    b = torch.randn(C, dtype=dtype)
    p = torch.rand(C, dtype=dtype) + 0.5
    rows = math.prod(lead) * B
    if kind.startswith("int64"):
        k = 1 if kind == "int64_1" else K
        pos = torch.randint(0, C, (rows, k))
        if k > 1:
            pos[0, 1] = pos[0, 0]  # a duplicate counts once
            pos[1, -1] = -1  # padding
            pos[2, :] = -1  # no positive
            pos[3, 0] = C  # background: no positive either
        else:
            pos[1, 0] = -1
            pos[3, 0] = C
        dense = torch.zeros(rows, C, dtype=torch.float64)
        for r in range(rows):
            for c in pos[r]:
                if 0 <= c < C:
                    dense[r, c] = 1.0
        target = pos.reshape(*lead, B) if k == 1 else pos.reshape(*lead, B, k)
        return x, w, b, p, target, dense.reshape(*lead, B, C)
    dense = (torch.rand(*lead, B, C) < 0.3).double()
    if kind == "float":
        dense = torch.rand(*lead, B, C, dtype=torch.float64)  # soft labels
        return x, w, b, p, dense.clone(), dense
    return x, w, b, p, dense.to(getattr(torch, kind)), dense


def oracle(x, w, b, p, dense, smoothing, reduction):
    """F.linear, then the elementwise loss from its definition (conftest), in float64."""
    logits = F.linear(x.double(), w.double(), None if b is None else b.double())
    loss = oracle_elementwise(logits, dense, p, smoothing)
    return loss.mean() if reduction == "mean" else loss.sum()


def grads_of(loss, tensors, upstream):
    return torch.autograd.grad(loss * upstream, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("kind", TARGETS)
def test_matches_unfused_composition(cpu_backend, kind, chunk_size):
    x, w, b_all, p_all, target, dense = make_case(kind)
    for use_bias, use_pw, smoothing, reduction in FEATURES:
        leaves = [t.clone().requires_grad_() for t in (x, w, b_all, p_all)]
        xg, wg, bg, pg = leaves
        b, p = (bg if use_bias else None), (pg if use_pw else None)
        upstream = torch.rand((), dtype=torch.float64) + 0.5  # a random incoming gradient
        loss = fs.linear_sigmoid_cross_entropy(xg, wg, target, b, pos_weight=p, label_smoothing=smoothing,
                                               reduction=reduction, chunk_size=chunk_size)
        assert loss.dtype == torch.float64 and loss.shape == ()
        expected = oracle(xg, wg, b, p, dense, smoothing, reduction)
        torch.testing.assert_close(loss, expected, **F64)
        got = grads_of(loss, (xg, wg, b, p), upstream)
        want = grads_of(expected, (xg, wg, b, p), upstream)
        for name, g, e in zip(["input", "weight", "bias", "pos_weight"], got, want):
            torch.testing.assert_close(g, e, **F64, msg=lambda m: f"{name} ({use_bias, use_pw, smoothing, reduction}): {m}")


@pytest.mark.parametrize("kind", ["float", "int64_1", "int64_k"])
def test_leading_dimensions_flatten(cpu_backend, kind):
    # input (..., H): rows are every leading index, targets shaped alike.
    x, w, b, p, target, dense = make_case(kind, B=3, lead=(2,))
    xg, wg = x.requires_grad_(), w.requires_grad_()
    loss = fs.linear_sigmoid_cross_entropy(xg, wg, target, b, chunk_size=2)
    expected = oracle(xg, wg, b, None, dense, 0.0, "mean")
    torch.testing.assert_close(loss, expected, **F64)
    for g, e in zip(torch.autograd.grad(loss, (xg, wg)), torch.autograd.grad(expected, (xg, wg))):
        torch.testing.assert_close(g, e, **F64)


def test_kernels_interpreted(monkeypatch):
    # The per-chunk loss through the Triton kernel under the interpreter:
    # tiny (each launch is interpreted), sparse and dense, ragged chunks.
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "triton")
    for kind in ("int64_k", "float"):
        x, w, b, p, target, dense = make_case(kind, B=5, H=3, C=6, K=3)
        xg, wg, bg = (t.requires_grad_() for t in (x, w, b))
        loss = fs.linear_sigmoid_cross_entropy(xg, wg, target, bg, pos_weight=p, label_smoothing=0.1, chunk_size=2)
        expected = oracle(xg, wg, bg, p, dense, 0.1, "mean")
        torch.testing.assert_close(loss, expected, **F64)
        for g, e in zip(torch.autograd.grad(loss, (xg, wg, bg)), torch.autograd.grad(expected, (xg, wg, bg))):
            torch.testing.assert_close(g, e, **F64)


def test_float32_and_bfloat16(cpu_backend):
    # Matmuls in the input dtype, the loss in float32; gradients in each
    # tensor's dtype. bf16: the composition's own rounding of the logits
    # (8 bits) bounds the agreement.
    for dtype, tol in ((torch.float32, dict(rtol=1e-4, atol=1e-5)), (torch.bfloat16, dict(rtol=3e-2, atol=3e-3))):
        x, w, b, _, target, dense = make_case("int64_k", B=33, H=16, C=40, dtype=dtype)
        xg, wg, bg = (t.requires_grad_() for t in (x, w, b))
        loss = fs.linear_sigmoid_cross_entropy(xg, wg, target, bg, chunk_size=8)
        assert loss.dtype == torch.float32
        expected = F.binary_cross_entropy_with_logits(F.linear(xg, wg, bg).float(), dense.float())
        torch.testing.assert_close(loss, expected, **tol)
        got, want = torch.autograd.grad(loss, (xg, wg, bg)), torch.autograd.grad(expected, (xg, wg, bg))
        for g, e, t in zip(got, want, (xg, wg, bg)):
            assert g.dtype == t.dtype
            torch.testing.assert_close(g.float(), e.float(), **tol)


def test_extreme_logits_stay_finite(cpu_backend):
    # Logits of +-1e4: finite loss and gradients, the limits of the definition.
    x, w, b, _, target, dense = make_case("int64_k")
    w = (w.sign() * 1e3).requires_grad_()
    x = (x.sign() * 10).requires_grad_()
    loss = fs.linear_sigmoid_cross_entropy(x, w, target, reduction="sum", chunk_size=3)
    grads = torch.autograd.grad(loss, (x, w))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(loss, oracle(x, w, None, None, dense, 0.0, "sum"), **F64)


def test_empty_batch_matches_pytorch(cpu_backend):
    # B = 0: "mean" is NaN (as PyTorch's), "sum" 0; the weight gradient is all zeros.
    x = torch.randn(0, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    for reduction, check in (("mean", math.isnan), ("sum", lambda v: v == 0.0)):
        loss = fs.linear_sigmoid_cross_entropy(x, w, torch.zeros(0, 2, dtype=torch.int64), reduction=reduction)
        assert check(loss.item())
        gx, gw = torch.autograd.grad(loss, (x, w))
        assert gx.shape == (0, 4) and torch.equal(gw, torch.zeros_like(w))


def test_no_grad_computes_no_gradients():
    # Under no_grad the engine asks the loss op for no gradient at all.
    x, w, b, _, target, dense = make_case("int64_k")
    with torch.no_grad():
        loss = fs.linear_sigmoid_cross_entropy(x.requires_grad_(), w, target, b)
        assert not loss.requires_grad
    torch.testing.assert_close(loss, oracle(x, w, b, None, dense, 0.0, "mean"), **F64)
    out = torch.ops.fused_sigxent.linear_sigmoid_ce(x, w, b, None, None, target, None, torch.tensor(0.0), 1, 0,
                                                    False, False, False, False, False)
    assert all(g.numel() == 0 for g in out[1:])


def test_deterministic(cpu_backend):
    # A fixed chunk order: bitwise the same loss and gradients run after run.
    x, w, b, _, target, _ = make_case("int64_k", B=40, C=30, dtype=torch.float32)
    runs = []
    for _ in range(2):
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        loss = fs.linear_sigmoid_cross_entropy(xg, wg, target, bg, chunk_size=7)
        runs.append((loss, *torch.autograd.grad(loss, (xg, wg, bg))))
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


class _LargestOutput(TorchDispatchMode):
    """Records the largest numel any op returns."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind", ["int64_k", "int64_1"])
def test_sparse_targets_never_dense(kind):
    # The engine's every intermediate is at most chunk x C (the labels buffer,
    # the logits chunk and its gradient) or a gradient's size (B x H, C x H),
    # never B x C.
    B, H, C, chunk = 64, 5, 50, 4
    x, w, b, _, target, _ = make_case(kind, B=B, H=H, C=C)
    positives = target.reshape(B, -1)
    with _LargestOutput() as mode:
        chunked.run_chunks(x, w, b, None, None, positives, None, torch.tensor(0.0, dtype=torch.float64),
                           R.TORCH_MEAN, chunk, True, True, True, False, False)
    assert 0 < mode.largest <= max(chunk * C, B * H, C * H) < B * C


@pytest.mark.parametrize("kind", ["float", "int64_k"])
def test_gradient_is_written_over_the_logits_chunk(cpu_backend, kind, monkeypatch):
    # The design: the loss writes d(loss)/d(logits) in place over the
    # chunk's logits (one chunk-sized float buffer serves every chunk), and
    # every gradient still matches the composition.
    from fused_sigxent import impl
    B, H, C, chunk = 10, 6, 30, 4
    x, w, b, p, target, dense = make_case(kind, B=B, H=H, C=C)
    dense_target = None if kind.startswith("int64") else target
    positives = target.reshape(B, -1) if kind.startswith("int64") else None
    calls = []
    implementation = impl.implementation

    def recording(device):
        fwd = implementation(device).sigmoid_ce_fwd

        def sigmoid_ce_fwd(logits, *args, **kwargs):
            out = fwd(logits, *args, **kwargs)
            calls.append((logits.data_ptr(), out[2].data_ptr(), logits.shape))
            return out
        return types.SimpleNamespace(sigmoid_ce_fwd=sigmoid_ce_fwd)

    monkeypatch.setattr(impl, "implementation", recording)
    got = chunked.run_chunks(x, w, b, None, dense_target, positives, p, torch.tensor(0.1, dtype=torch.float64),
                             R.TORCH_MEAN, chunk, True, True, True, False, True)
    assert [shape[0] for _, _, shape in calls] == [4, 4, 2]
    assert all(logits == grad for logits, grad, _ in calls)
    assert len({logits for logits, _, _ in calls}) == 1  # one buffer, reused
    xg, wg, bg, pg = (t.clone().requires_grad_() for t in (x, w, b, p))
    expected = oracle(xg, wg, bg, pg, dense, 0.1, "mean")
    want = torch.autograd.grad(expected, (xg, wg, bg, pg))
    torch.testing.assert_close(got[0], expected.detach(), **F64)
    for g, e in zip((got[1], got[2], got[3], got[5]), want):
        torch.testing.assert_close(g, e, **F64)


@pytest.mark.parametrize("backend", ["reference", "auto", "triton"])
def test_loss_writes_its_gradient_over_its_logits(backend, monkeypatch):
    # `grad_logits_out=logits`, what the engine passes: the gradient lands in
    # the logits tensor, equal to the one a separate output gets; on the CPU
    # path a tile the fast formulas fail (an infinite logit) is redone by
    # the reference from logits still intact.
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", backend)
    from fused_sigxent import impl as implementations
    from fused_sigxent.impl import cpu
    monkeypatch.setattr(cpu, "TILE", 16)
    impl = implementations.implementation(torch.device("cpu")).sigmoid_ce_fwd
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(5, 13) * 4).to(dtype)
        logits[2, 3] = float("inf")
        labels = (torch.rand(5, 13) > 0.5).to(torch.uint8)
        pw = torch.rand(13) + 0.5
        s = torch.tensor(0.1)
        loss, _, grad, _ = impl(logits, labels, None, pw, s, 1, torch.float32, True, False)
        buffer = logits.clone()
        loss_in_place, _, grad_in_place, _ = impl(buffer, labels, None, pw, s, 1, torch.float32, True, False,
                                                  grad_logits_out=buffer)
        assert grad_in_place.data_ptr() == buffer.data_ptr()
        torch.testing.assert_close(loss_in_place, loss, rtol=0, atol=0)
        torch.testing.assert_close(buffer, grad, rtol=0, atol=0, equal_nan=True)


def test_chunk_heuristic():
    cpu = torch.device("cpu")
    assert chunked.chunk_rows(8192, 32768, cpu) == 256  # 8M elements / C
    assert chunked.chunk_rows(2048, 262144, cpu) == chunked.MIN_CHUNK_ROWS  # wide C: the row floor
    assert chunked.chunk_rows(10, 5, cpu) == 10  # never more than B
    assert chunked.chunk_rows(10, 5, cpu, 3) == 3 and chunked.chunk_rows(10, 5, cpu, 50) == 10


def test_opcheck():
    x, w, b, p, target, _ = make_case("int64_k")
    dense = torch.rand(7, 11, dtype=torch.float64)
    s = torch.tensor(0.1, dtype=torch.float64)
    xg, wg, bg, pg = (t.requires_grad_() for t in (x, w, b, p))
    op = torch.ops.fused_sigxent.linear_sigmoid_ce
    torch.library.opcheck(op, (xg, wg, bg, None, None, target, pg, s, R.TORCH_MEAN, 3,
                               True, True, True, False, True))
    torch.library.opcheck(op, (xg, wg, None, None, dense, None, None, s, R.SUM, 0,
                               True, False, False, False, False))


def test_compiled_fullgraph_matches_eager():
    # fullgraph=True: a graph break would raise. Dense and sparse targets,
    # dynamic shapes, the loss and every gradient equal to eager's.
    def step(x, w, b, target):
        return fs.linear_sigmoid_cross_entropy(torch.tanh(x), w, target, b, label_smoothing=0.1, chunk_size=3)

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for kind in ("float", "int64_k"):
        x, w, b, _, target, _ = make_case(kind)
        leaves = [t.requires_grad_() for t in (x, w, b)]
        loss = compiled(*leaves, target)
        expected = step(*leaves, target)
        torch.testing.assert_close(loss, expected, **F64)
        for g, e in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves)):
            torch.testing.assert_close(g, e, **F64)


# ---- bad input: ValueError / TypeError naming the argument, before any compute


def _bad(**overrides):
    x, w, b, p, target, _ = make_case("int64_k")
    args = dict(input=x, weight=w, target=target, bias=b, pos_weight=p)
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, error, words", [
    (dict(weight=torch.randn(11, 6, dtype=torch.float64)), ValueError, "H = 5"),
    (dict(weight=torch.randn(11, dtype=torch.float64)), ValueError, "weight must be 2-D"),
    (dict(bias=torch.randn(12, dtype=torch.float64)), ValueError, "bias"),
    (dict(pos_weight=torch.rand(10, dtype=torch.float64)), ValueError, "pos_weight"),
    (dict(target=torch.full((7, 2), 12)), ValueError, "class indices outside [-1, 11]"),
    (dict(target=torch.full((7, 2), -2)), ValueError, "class indices outside [-1, 11]"),
    (dict(target=torch.zeros(7, 11, dtype=torch.int64)), ValueError, "bool, uint8 or float"),
    (dict(target=torch.zeros(7, 12, dtype=torch.int64)), ValueError, "K < C"),
    (dict(target=torch.zeros(7, 3, dtype=torch.float64)), ValueError, "dense target must have shape (7, 11)"),
    (dict(target=torch.zeros(6, 2, dtype=torch.int64)), ValueError, "int64 target"),
    (dict(target=torch.zeros(7, 2, dtype=torch.int32)), TypeError, "target"),
    (dict(weight=torch.randn(11, 5, dtype=torch.float32)), TypeError, "weight must have input's dtype"),
    (dict(input=torch.randn(7, 5, dtype=torch.float64).to(torch.int64)), TypeError, "input"),
    (dict(input=torch.tensor(1.0, dtype=torch.float64)), ValueError, "input"),
    (dict(target=None), ValueError, "target must be a tensor"),
])
def test_bad_input(overrides, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        fs.linear_sigmoid_cross_entropy(**_bad(**overrides))


def test_bad_options():
    args = _bad()
    with pytest.raises(ValueError, match=r"binary_cross_entropy_with_logits\(F.linear\(input, weight, bias\)"):
        fs.linear_sigmoid_cross_entropy(**args, reduction="none")
    with pytest.raises(ValueError, match="'avg' is not a valid value for reduction"):
        fs.linear_sigmoid_cross_entropy(**args, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        fs.linear_sigmoid_cross_entropy(**args, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        fs.linear_sigmoid_cross_entropy(**args, chunk_size=2.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        fs.linear_sigmoid_cross_entropy(**args, label_smoothing=1.5)
    soft = torch.rand(7, 11, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="target requires grad"):
        fs.linear_sigmoid_cross_entropy(**dict(args, target=soft))


def test_out_of_range_index_raises_under_compile():
    # The range check lives in the op, so a compiled graph (which cannot
    # branch on data) still raises instead of computing a poisoned loss.
    x, w, b, _, target, _ = make_case("int64_k")
    compiled = torch.compile(lambda x, w, t: fs.linear_sigmoid_cross_entropy(x, w, t), fullgraph=True)
    compiled(x, w, target)
    with pytest.raises(ValueError, match="class indices outside"):
        compiled(x, w, target.clamp_min(0) + 12)


def test_unsupported_modes_are_refused_by_name():
    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    z = torch.rand(4, 5)
    loss = fs.linear_sigmoid_cross_entropy(x, w, z)
    # Second order: the forward's gradients are data, so a double backward
    # would see a zero second derivative; it raises instead.
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(lambda t: fs.linear_sigmoid_cross_entropy(t, w.detach(), z))(x.detach())
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(lambda t: fs.siglip_loss(t, x.detach(), 2.0, -1.0))(x.detach())
    # A retained graph still gives first-order gradients.
    loss = fs.linear_sigmoid_cross_entropy(x, w, z)
    (gx,) = torch.autograd.grad(loss, x)
    expected = torch.autograd.grad(F.binary_cross_entropy_with_logits(F.linear(x, w), z), x)[0]
    torch.testing.assert_close(gx, expected)


def test_dtensor_inputs_are_refused_by_name(monkeypatch):
    # (A DTensor weight is the class-parallel head: tests/distributed/test_sharded.py.)
    from fused_sigxent.op import routes

    x = torch.randn(4, 3)
    monkeypatch.setattr(routes, "is_dtensor", lambda *tensors: any(t is x for t in tensors))
    with pytest.raises(NotImplementedError, match="DTensor.*Shard\\(0\\)"):
        fs.linear_sigmoid_cross_entropy(x, torch.randn(5, 3), torch.rand(4, 5))
    monkeypatch.setattr(routes, "is_dtensor", lambda *tensors: True)
    with pytest.raises(NotImplementedError, match="DTensor"):
        fs.siglip_loss(torch.randn(4, 3), torch.randn(4, 3), 1.0, 0.0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_batch_with_no_positives_and_an_empty_batch(reduction):
    # K = 0 is valid (the all-negative loss), and so is an empty batch:
    # "sum" 0 and "mean" NaN, as PyTorch's loss of an empty tensor.
    x, w, b, p, _, _ = make_case("float")
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    loss = fs.linear_sigmoid_cross_entropy(xg, wg, torch.zeros(7, 0, dtype=torch.int64), bg, reduction=reduction)
    want = oracle(x, w, b, None, torch.zeros(7, 11, dtype=torch.float64), 0.0, reduction)
    torch.testing.assert_close(loss, want, **F64)
    xo, wo, bo = (t.clone().requires_grad_() for t in (x, w, b))
    expected = torch.autograd.grad(oracle(xo, wo, bo, None, torch.zeros(7, 11, dtype=torch.float64), 0.0, reduction),
                                   (xo, wo, bo))
    for g, e in zip(torch.autograd.grad(loss, (xg, wg, bg)), expected):
        torch.testing.assert_close(g, e, **F64)
    empty = torch.zeros(0, 5, dtype=torch.float64, requires_grad=True)
    for target in (torch.zeros(0, 0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                   torch.zeros(0, 11, dtype=torch.bool)):
        loss = fs.linear_sigmoid_cross_entropy(empty, wg, target, reduction=reduction)
        assert (loss.isnan() if reduction == "mean" else loss == 0), (target.shape, loss)
        gx, gw = torch.autograd.grad(loss, (empty, wg))
        assert gx.shape == (0, 5) and (gw == 0).all()


def test_minus_one_and_c_mean_no_positive_as_in_the_focal_loss():
    x, w, b, p, _, _ = make_case("float")
    target = torch.tensor([[0, 11], [11, -1], [-1, -1], [3, 3], [10, 11], [11, 11], [2, 5]])
    dense = torch.zeros(7, 11, dtype=torch.float64)
    for r, row in enumerate(target.tolist()):
        for c in row:
            if 0 <= c < 11:
                dense[r, c] = 1.0
    torch.testing.assert_close(fs.linear_sigmoid_cross_entropy(x, w, target, b), oracle(x, w, b, None, dense, 0.0,
                                                                                          "mean"), **F64)


def test_an_int64_multi_hot_target_is_refused_not_read_as_ids():
    # A (B, C) 0/1 int64 tensor would otherwise name class 0 at every 0.
    x, w, _, _, _, dense = make_case("bool")
    with pytest.raises(ValueError, match="Pass dense labels as bool, uint8 or float"):
        fs.linear_sigmoid_cross_entropy(x, w, dense.long())
    torch.testing.assert_close(fs.linear_sigmoid_cross_entropy(x, w, dense.to(torch.uint8)),
                               oracle(x, w, None, None, dense, 0.0, "mean"), **F64)


def test_chunk_size_beyond_any_batch_is_one_chunk():
    x, w, b, _, target, _ = make_case("int64_k")
    one = fs.linear_sigmoid_cross_entropy(x, w, target, b, chunk_size=None)
    for huge in (2**31, 2**70):
        torch.testing.assert_close(fs.linear_sigmoid_cross_entropy(x, w, target, b, chunk_size=huge), one, **F64)


class _OpDtypes(TorchDispatchMode):
    """The dtypes of the fused linear op's input and weight, as it received them."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "linear_sigmoid_ce" in str(func):
            self.seen.append((args[0].dtype, args[1].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float32])
def test_autocast_runs_the_matmuls_in_its_dtype_as_f_linear(input_dtype):
    # Under torch.autocast F.linear runs in the autocast dtype whatever its
    # inputs' (bf16 activations with an fp32 head, or all fp32), and the
    # loss in float32: the same here, gradients in each parameter's dtype.
    torch.manual_seed(1)
    x = torch.randn(6, 8).to(input_dtype).requires_grad_()
    w = torch.randn(5, 8, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    ids = torch.tensor([0, 4, 2, -1, 3, 1])
    dense = torch.nn.functional.one_hot(ids.clamp_min(0), 5).float()
    dense[3] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with _OpDtypes() as mode:
            loss = fs.linear_sigmoid_cross_entropy(x, w, ids, b)
        want = F.binary_cross_entropy_with_logits(F.linear(x, w, b), dense)
    assert mode.seen == [(torch.bfloat16, torch.bfloat16)]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=1e-3, atol=1e-3)
    got = torch.autograd.grad(loss, (x, w, b))
    expected = torch.autograd.grad(want, (x, w, b))
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-3)


def test_outside_autocast_a_dtype_mismatch_is_still_an_error():
    with pytest.raises(TypeError, match="weight must have input's dtype"):
        fs.linear_sigmoid_cross_entropy(torch.randn(4, 3).bfloat16(), torch.randn(5, 3), torch.tensor([0, 1, 2, 3]))
