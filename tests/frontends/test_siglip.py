"""fs.siglip_loss against open_clip's SigLipLoss (re-implemented) in float64, on both backends."""

import pytest
import torch
import torch.nn.functional as F

import fused_sigxent as fs
from fused_sigxent.core import reduction as R

F64 = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(params=["reference", "auto"])
def cpu_backend(request, monkeypatch):
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", request.param)
    return request.param


def open_clip_siglip(image_features, text_features, logit_scale, logit_bias):
    """open_clip's SigLipLoss._loss (world_size 1, negative_only=False):
    logits = t x y^T + b, labels = 2 I - 1, -logsigmoid(labels * logits).sum() / N."""
    logits = logit_scale * image_features @ text_features.T + logit_bias
    n = image_features.shape[0]
    labels = 2 * torch.eye(n, dtype=image_features.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n


def features(n, d=6, dtype=torch.float64):
    x = F.normalize(torch.randn(n, d, dtype=dtype), dim=-1)
    y = F.normalize(x + 0.5 * torch.randn(n, d, dtype=dtype), dim=-1)  # matching pairs correlate
    return x.requires_grad_(), y.requires_grad_()


# N = 1 (only the positive), 2, 7 (odd, ragged chunks) and 64 (chunk heuristic, several chunks at 5).
@pytest.mark.parametrize("n", [1, 2, 7, 64])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_matches_open_clip_tensor_scale_and_bias(cpu_backend, n, chunk_size):
    if chunk_size == 1 and n == 64:
        chunk_size = 3  # 64 chunks of one row cost time and test nothing N = 7 does not
    x, y = features(n)
    t = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    upstream = torch.rand((), dtype=torch.float64) + 0.5
    loss = fs.siglip_loss(x, y, t, b, chunk_size=chunk_size)
    expected = open_clip_siglip(x, y, t, b)
    assert loss.dtype == torch.float64 and loss.shape == ()
    torch.testing.assert_close(loss, expected, **F64)
    got = torch.autograd.grad(loss * upstream, (x, y, t, b))
    want = torch.autograd.grad(expected * upstream, (x, y, t, b))
    for name, g, e in zip(["image_features", "text_features", "logit_scale", "logit_bias"], got, want):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, **F64, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("n", [1, 7])
def test_float_scale_and_bias(cpu_backend, n):
    # Python numbers: gradients for the features only.
    x, y = features(n)
    loss = fs.siglip_loss(x, y, 3.5, -2.0, chunk_size=3)
    expected = open_clip_siglip(x, y, 3.5, -2.0)
    torch.testing.assert_close(loss, expected, **F64)
    for g, e in zip(torch.autograd.grad(loss, (x, y)), torch.autograd.grad(expected, (x, y))):
        torch.testing.assert_close(g, e, **F64)


def test_constant_tensor_scale_learned_bias(cpu_backend):
    # t a tensor without grad, b a learned one; chunk larger than N.
    x, y = features(7)
    t = torch.tensor(5.0, dtype=torch.float64)
    b = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    loss = fs.siglip_loss(x, y, t, b, chunk_size=100)
    expected = open_clip_siglip(x, y, t, b)
    torch.testing.assert_close(loss, expected, **F64)
    for g, e in zip(torch.autograd.grad(loss, (x, y, b)), torch.autograd.grad(expected, (x, y, b))):
        torch.testing.assert_close(g, e, **F64)


def test_open_clip_parameterisation(cpu_backend):
    # open_clip learns log t and b as parameters and passes t = exp(log t):
    # the gradient reaches the log through the exp outside our op.
    x, y = features(7)
    log_t = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    loss = fs.siglip_loss(x, y, log_t.exp(), b)
    expected = open_clip_siglip(x, y, log_t.exp(), b)
    for g, e in zip(torch.autograd.grad(loss, (log_t, b)), torch.autograd.grad(expected, (log_t, b))):
        torch.testing.assert_close(g, e, **F64)


def test_float32_features(cpu_backend):
    x, y = features(33, d=16, dtype=torch.float32)
    t = torch.tensor(10.0, requires_grad=True)
    b = torch.tensor(-10.0, requires_grad=True)
    loss = fs.siglip_loss(x, y, t, b, chunk_size=8)
    expected = open_clip_siglip(x, y, t, b)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    got, want = torch.autograd.grad(loss, (x, y, t, b)), torch.autograd.grad(expected, (x, y, t, b))
    for g, e in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_kernels_interpreted(monkeypatch):
    # The per-chunk loss through the Triton kernel under the interpreter, tiny.
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "triton")
    x, y = features(5, d=3)
    t = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    loss = fs.siglip_loss(x, y, t, b, chunk_size=2)
    expected = open_clip_siglip(x, y, t, b)
    torch.testing.assert_close(loss, expected, **F64)
    for g, e in zip(torch.autograd.grad(loss, (x, y, t, b)), torch.autograd.grad(expected, (x, y, t, b))):
        torch.testing.assert_close(g, e, **F64)


def test_opcheck():
    x, y = features(6)
    t = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.0, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fused_sigxent.linear_sigmoid_ce,
                          (x, y, b, t, None, None, None, s, R.MEAN_BY_ROWS, 4, True, True, True, True, False))


def test_compiled_fullgraph_matches_eager():
    def step(x, y, t, b):
        return fs.siglip_loss(x, y, t.exp(), b, chunk_size=3)

    compiled = torch.compile(step, fullgraph=True)
    x, y = features(7)
    t = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
    loss, expected = compiled(x, y, t, b), step(x, y, t, b)
    torch.testing.assert_close(loss, expected, **F64)
    leaves = (x, y, t, b)
    for g, e in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves)):
        torch.testing.assert_close(g, e, **F64)


@pytest.mark.parametrize("change, error, words", [
    (dict(image_features=torch.randn(6, dtype=torch.float64)), ValueError, "image_features must be 2-D"),
    (dict(text_features=torch.randn(2, 3, 6, dtype=torch.float64)), ValueError, "text_features must be 2-D"),
    (dict(text_features=torch.randn(5, 6, dtype=torch.float64)), ValueError, "same shape"),
    (dict(text_features=torch.randn(7, 6, dtype=torch.float32)), TypeError, "text_features"),
    (dict(logit_scale=torch.ones(2, dtype=torch.float64)), ValueError, "logit_scale"),
    (dict(logit_bias="a"), TypeError, "logit_bias"),
    (dict(logit_scale=torch.tensor(1)), TypeError, "logit_scale must be floating"),
    (dict(image_features=None), ValueError, "image_features must be a tensor"),
])
def test_bad_input(change, error, words):
    x, y = features(7)
    args = dict(image_features=x, text_features=y, logit_scale=10.0, logit_bias=-10.0)
    args.update(change)
    with pytest.raises(error, match=words):
        fs.siglip_loss(**args)
    with pytest.raises(ValueError, match="chunk_size"):
        fs.siglip_loss(x, y, 1.0, 0.0, chunk_size=-1)
