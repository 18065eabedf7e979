"""Bad arguments raise ValueError/TypeError naming what is wrong, before any
kernel runs (fused_sigxent/frontends/checks.py and the front ends)."""

import pytest
import torch

import fused_sigxent as fs

X, Z = torch.randn(3, 4), torch.rand(3, 4)

BAD_CALLS = {
    # name: (call, exception, message fragment)
    "None logits": (lambda: fs.binary_cross_entropy_with_logits(None, Z), ValueError, "input"),
    "None labels": (lambda: fs.sigmoid_cross_entropy_with_logits(labels=None, logits=X), ValueError, "labels"),
    "list logits": (lambda: fs.sigmoid_cross_entropy_with_logits(labels=Z, logits=[[1.0]]), TypeError, "logits"),
    "integer logits": (lambda: fs.binary_cross_entropy_with_logits(X.long(), Z), TypeError, "int64"),
    "integer labels (torch)": (lambda: fs.binary_cross_entropy_with_logits(X, Z.long()), TypeError, "int64"),
    "integer labels (tf.nn)": (
        lambda: fs.sigmoid_cross_entropy_with_logits(labels=Z.int(), logits=X), TypeError, "int32"),
    "complex labels (tf.losses)": (lambda: fs.sigmoid_cross_entropy(Z.to(torch.complex64), X), TypeError, "complex64"),
    "label shape": (lambda: fs.binary_cross_entropy_with_logits(X, Z[:2]), ValueError, r"\(2, 4\).*\(3, 4\)"),
    "flipped label shape": (
        lambda: fs.deprecated_flipped_sigmoid_cross_entropy_with_logits(X, Z.t()), ValueError, r"\(4, 3\)"),
    "weight broadcast": (lambda: fs.binary_cross_entropy_with_logits(X, Z, torch.rand(3)), ValueError, r"\(3,\)"),
    "weight grows logits": (
        lambda: fs.binary_cross_entropy_with_logits(X, Z, torch.rand(2, 3, 4)), ValueError, "weight"),
    "pos_weight broadcast": (
        lambda: fs.binary_cross_entropy_with_logits(X, Z, pos_weight=torch.rand(5)), ValueError, "pos_weight"),
    "tf pos_weight broadcast": (
        lambda: fs.weighted_cross_entropy_with_logits(labels=Z, logits=X, pos_weight=torch.rand(2)),
        ValueError, "pos_weight"),
    "tf weights rank": (lambda: fs.sigmoid_cross_entropy(Z, X, torch.rand(4)), ValueError, "weights of shape"),
    "number weight (torch)": (lambda: fs.binary_cross_entropy_with_logits(X, Z, 2.0), TypeError, "weight"),
    "smoothing below 0": (lambda: fs.sigmoid_cross_entropy(Z, X, label_smoothing=-0.1), ValueError, "label_smoothing"),
    "smoothing above 1": (
        lambda: fs.binary_cross_entropy_with_logits(X, Z, label_smoothing=1.5), ValueError, "label_smoothing"),
    "smoothing NaN": (
        lambda: fs.binary_cross_entropy_with_logits(X, Z, label_smoothing=float("nan")), ValueError, "label_smoothing"),
    "smoothing string": (lambda: fs.sigmoid_cross_entropy(Z, X, label_smoothing="0.1"), TypeError, "label_smoothing"),
    "torch reduction": (lambda: fs.binary_cross_entropy_with_logits(X, Z, reduction="avg"), ValueError, "avg"),
    "tf reduction": (lambda: fs.sigmoid_cross_entropy(Z, X, reduction="mean"), ValueError, "mean"),
    "tf reduction type": (lambda: fs.sigmoid_cross_entropy(Z, X, reduction=3), ValueError, "3"),
    "module reduction": (lambda: fs.BCEWithLogitsLoss(reduction="batchmean"), ValueError, "batchmean"),
    "module weight type": (lambda: fs.BCEWithLogitsLoss(weight=[1.0, 2.0]), TypeError, "weight"),
    "module smoothing": (lambda: fs.BCEWithLogitsLoss(label_smoothing=2), ValueError, "label_smoothing"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise_before_any_kernel(backend, launches, case):
    call, error, message = BAD_CALLS[case]
    with pytest.raises(error, match=message):
        call()
    assert launches == {}


def test_unknown_backend_is_a_value_error(monkeypatch):
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="cudnn"):
        fs.binary_cross_entropy_with_logits(X, Z)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fs.binary_cross_entropy_with_logits(X, Z)


def test_number_constants_are_never_cached_from_a_capture(monkeypatch):
    # A tensor made inside a CUDA graph capture is filled only at replay and
    # lives in the graph's pool: cached, it would feed later eager calls garbage.
    import types

    from fused_sigxent.core.dtypes import number_as_tensor

    made = []
    monkeypatch.setattr(torch, "full", lambda *a, **k: made.append(k["device"]) or object())
    x = types.SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert number_as_tensor(0.37, x) is not number_as_tensor(0.37, x)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert number_as_tensor(0.37, x) is number_as_tensor(0.37, x)
    assert len(made) == 3


def test_number_constants_made_under_a_transform_are_never_cached():
    # What torch.full makes inside torch.func.jvp is a wrapper with no storage
    # once the transform ends: cached, it would break every later call.
    from fused_sigxent.core.dtypes import number_as_tensor

    x = torch.randn(3, dtype=torch.float64)
    torch.func.jvp(lambda t: number_as_tensor(0.123, t, torch.float64) * t, (x,), (x,))
    assert number_as_tensor(0.123, x, torch.float64).data_ptr()
    fs.binary_cross_entropy_with_logits(x, torch.rand(3, dtype=torch.float64), label_smoothing=0.123)
