"""Shared fixtures: both backends, the dtype-keyed tolerance table, a float64
oracle written independently of `impl/reference.py`, and poisoned allocations."""

import math
import os

# Triton decides interpretation when a kernel is decorated, so this must be
# set before fused_sigxent.kernels is imported by any test.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

HAS_GPU = torch.cuda.is_available()

# Compared in the output dtype. fp16/bf16: a few units of the last place
# (2**-10, 2**-7), since the forward-written gradient is rounded twice
# (once at 1/denominator, once after the incoming gradient). fp32: summation
# order differs between the kernels and torch's sum. fp64: the same, 2**-52.
TOLERANCES = {
    torch.float16: dict(rtol=4e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=1e-2),
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
}


class OpNames(TorchDispatchMode):
    """Records the name of every op dispatched while it is on."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def on_reference(fn, *args, **kwargs):
    """fn(*args, **kwargs) with FUSED_SIGXENT_BACKEND=reference (the definition)."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("FUSED_SIGXENT_BACKEND", "reference")
        return fn(*args, **kwargs)


def assert_close(actual, expected, dtype=None, msg=""):
    dtype = dtype or actual.dtype
    torch.testing.assert_close(
        actual.to(torch.float64), expected.to(torch.float64), equal_nan=True, msg=msg or None,
        **TOLERANCES[dtype],
    )


def oracle_elementwise(x, z, pos_weight=None, label_smoothing=0.0):
    """l = p z' softplus(-x) + (1 - z') softplus(x), in float64, from the
    definition (not from `impl/reference.py`'s stable rewrite)."""
    x, z = x.double(), z.double()
    z = z * (1 - label_smoothing) + 0.5 * label_smoothing
    p = 1.0 if pos_weight is None else pos_weight.double()
    zero = torch.zeros_like(x)
    # softplus(x) = log(1 + e^x) = logaddexp(0, x): exact in float64 at any |x|
    # (F.softplus switches to x past its threshold of 20, which is not).
    return p * z * torch.logaddexp(zero, -x) + (1 - z) * torch.logaddexp(zero, x)


def second_derivatives(f, leaves):
    """d/d(leaves) of sum_i v_i . df/d(leaf i), v_i a fixed vector per leaf:
    every second derivative of the scalar f, mixed ones included, at once."""
    first = torch.autograd.grad(f(*leaves), leaves, create_graph=True)
    return torch.autograd.grad(
        sum((g * torch.linspace(-1, 2, g.numel(), dtype=g.dtype).view_as(g)).sum() for g in first), leaves)


def aot_graphs():
    """(backend, graphs): a torch.compile backend that keeps the call_function
    nodes of the forward and backward graphs AOTAutograd hands its compilers,
    in graphs["fwd"] and graphs["bwd"], and runs them as they are."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = [node for node in gm.graph.nodes if node.op == "call_function"]
            return gm.forward
        return compiler

    return aot_autograd(fw_compiler=keep("fwd"), bw_compiler=keep("bwd")), graphs


def oracle_reduce(loss, weight, reduction):
    """TF/PyTorch reductions (docs/semantics.md) in float64, on an elementwise loss."""
    w = torch.ones_like(loss) if weight is None else weight.double().expand(loss.shape)
    total = (w * loss).sum()
    if reduction == "none":
        return w * loss
    if reduction == "sum":
        return total
    if reduction == "torch_mean":
        return total / loss.numel() if loss.numel() else total * math.nan
    denom = {"mean": w.sum(), "numel": float(loss.numel()), "nonzero": (w != 0).sum().double()}[reduction]
    # TF's "no NaN" division: a zero denominator gives 0, and a zero gradient.
    return total / denom if denom != 0 else total * 0


TOOLING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tooling")


def pytest_collection_modifyitems(config, items):
    """Tests under tests/tooling/ check the repository's tools (perf sweeps,
    PTX and SASS reports) rather than the package: marked `tooling`, so
    `-m tooling` (or `-m "not tooling"`) selects them."""
    for item in items:
        if str(item.path).startswith(TOOLING + os.sep):
            item.add_marker(pytest.mark.tooling)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_plans():
    """Plans (call plans and launch plans) made by no other test: a plan keeps
    what was decided when it was made (FAST_MATH, int64 offsets, the kernel
    object), and tests patch those."""
    from fused_sigxent.core.plans import PLANS

    PLANS.clear()
    yield
    PLANS.clear()


@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    """Runs a test through the reference path and through the Triton kernels
    (interpreted here, compiled on a GPU)."""
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", request.param)
    return request.param


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_GPU else "cpu")


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty and torch.empty_like returns NaN (floats) or -1
    (integers), so an output element a kernel fails to write shows up as a
    mismatch."""
    def poisoning(make):
        def poisoned_make(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(math.nan) if t.is_floating_point() else t.fill_(-1 if t.dtype != torch.bool else True)
        return poisoned_make

    monkeypatch.setattr(torch, "empty", poisoning(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoning(torch.empty_like))


@pytest.fixture
def launches(monkeypatch):
    """Counts Triton kernel launches, by kernel name, under the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    counts: dict[str, int] = {}
    run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        counts[self.fn.__name__] = counts.get(self.fn.__name__, 0) + 1
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    return counts


def torchvision_focal(x, z, alpha, gamma, reduction="none", weight=None, label_smoothing=0.0):
    """torchvision.ops.sigmoid_focal_loss, re-implemented in float64 (plus weight and smoothing)."""
    x, z = x.double(), z.double()
    z = z * (1 - label_smoothing) + 0.5 * label_smoothing
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, z, reduction="none")
    p_t = p * z + (1 - p) * (1 - z)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * z + (1 - alpha) * (1 - z)) * loss
    if weight is not None:
        loss = loss * weight.double()
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]
