"""The backend switch and the device every launch runs on (`fused_sigxent/core/backend.py`)."""

import pytest
import torch

import fused_sigxent as fs
from fused_sigxent.core import backend as _backend
from fused_sigxent.op import routes


def test_launches_run_on_the_tensors_device(monkeypatch):
    # Triton launches on the current device: a cuda:1 tensor must make
    # cuda:1 current for the launch (checked on two GPUs in test_gpu.py).
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = _backend.on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    # The current device, or a CPU tensor: nothing to switch.
    assert not isinstance(_backend.on_device(torch.device("cuda", 0)), torch.cuda.device)
    assert not isinstance(_backend.on_device(torch.device("cpu")), torch.cuda.device)


def test_every_op_enters_the_device_guard(backend, monkeypatch):
    # Through the op's route; a call plan holds only on the current device (below).
    monkeypatch.setattr(routes, "unobserved", lambda *a: False)
    entered = []
    on_device = _backend.on_device
    monkeypatch.setattr(_backend, "on_device", lambda device: entered.append(device.type) or on_device(device))
    x, z = torch.randn(3, 4, requires_grad=True), torch.rand(3, 4)
    fs.binary_cross_entropy_with_logits(x, z).backward(torch.tensor(2.0))  # fwd, then scale
    fs.binary_cross_entropy_with_logits(x, z, reduction="none").sum().backward()  # fwd, then bwd
    assert entered == ["cpu"] * 4


def test_call_plans_run_only_on_the_current_cuda_device_and_never_in_a_capture(monkeypatch):
    # Triton launches on the current device: a plan made for cuda:0 would
    # read a cuda:1 call's tensors from the wrong device, and a capture must
    # keep nothing a plan holds. Those calls take the op's route instead.
    current, capturing = [0], [False]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    assert routes.unobserved(None) and routes.unobserved(0) and not routes.unobserved(1)
    current[0] = 1
    assert routes.unobserved(1) and not routes.unobserved(0)
    capturing[0] = True
    assert not routes.unobserved(1) and routes.unobserved(None)


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="cudnn"):
        fs.binary_cross_entropy_with_logits(torch.randn(2), torch.rand(2))
