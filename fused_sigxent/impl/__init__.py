"""The implementations of the ops: the reference (the definition, plain
PyTorch), the CPU path (a compiled loop, with ATen tiles where it is not
built) and the Triton kernels (`fused_sigxent.kernels`). Each provides the
functions of `Implementation`, with the same signatures; `implementation`
picks one by backend and device.
"""

import functools
import types
from typing import Protocol

import torch
from torch import Tensor

from ..core import backend as _backend


class Implementation(Protocol):
    """The functions every implementation provides (a module of them: the
    reference's, the CPU path's, or the kernels' launchers), one per op.

    The op schemas (`op/registry.py`) take exactly these arguments, less one:
    `grad_logits_out`, which only a caller inside an op's own implementation
    passes (the chunked linear engine, `impl/chunked.py`): a tensor of the
    logits' shape and dtype, possibly the logits themselves, that receives
    the logits gradient and is returned as it. An op cannot return an output
    that aliases an input, so it stays out of the schema.
    """

    def sigmoid_ce_fwd(
        self,
        logits: Tensor,
        labels: Tensor,
        weight: Tensor | None,
        pos_weight: Tensor | None,
        label_smoothing: Tensor,
        reduction: int,
        out_dtype: torch.dtype,
        grad_logits_in_fwd: bool,
        grad_labels_in_fwd: bool,
        gamma: Tensor | None = None,
        alpha: Tensor | None = None,
        hard_labels: bool = False,
        *,
        grad_logits_out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(loss, denominator, grad_logits, grad_labels): the loss, reduced
        (0-d) or elementwise (NONE), in `out_dtype`; what it was divided by
        (0-d, compute dtype); and, where `grad_*_in_fwd`, the gradients of the
        loss for an incoming gradient of 1 (else 0-size). gamma (0-d): the
        focal loss with that gamma and alpha (0-d, or None for no alpha_t);
        hard_labels: a promise that every smoothed label is 0 or 1. int64
        labels: class indices of shape logits.shape[:-1]."""

    def sigmoid_ce_bwd(
        self,
        grad: Tensor,
        logits: Tensor,
        labels: Tensor,
        weight: Tensor | None,
        pos_weight: Tensor | None,
        denom: Tensor,
        label_smoothing: Tensor,
        reduction: int,
        need_grad_logits: bool,
        need_grad_labels: bool,
        gamma: Tensor | None = None,
        alpha: Tensor | None = None,
        hard_labels: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """(grad_logits, grad_labels) recomputed from the inputs for the
        incoming gradient `grad` (0-d for a reduced loss, the logits' shape
        for NONE); 0-size where not needed."""

    def sigmoid_ce_scale_(self, grad: Tensor, grad_logits: Tensor, grad_labels: Tensor) -> None:
        """Multiplies, in place, gradients the forward wrote for an incoming
        gradient of 1 by the incoming 0-d `grad`; no pass where it is 1."""


def implementation(device: torch.device) -> Implementation:
    """The implementation that runs on `device` under the current backend:
    the Triton kernels, the CPU path (`auto` on CPU tensors), or the reference."""
    if _backend.use_kernels(device):
        return _kernels()
    if device.type == "cpu" and _backend.backend() == "auto":
        from . import cpu

        return cpu
    from . import reference

    return reference


@functools.cache
def _kernels() -> Implementation:
    # Imported on first use: Triton reads TRITON_INTERPRET when a kernel is
    # decorated, so importing late lets a process choose it before the first call.
    from ..kernels import sigmoid_ce_bwd, sigmoid_ce_fwd, sigmoid_ce_scale

    return types.SimpleNamespace(sigmoid_ce_fwd=sigmoid_ce_fwd.sigmoid_ce_fwd,
                                 sigmoid_ce_bwd=sigmoid_ce_bwd.sigmoid_ce_bwd,
                                 sigmoid_ce_scale_=sigmoid_ce_scale.sigmoid_ce_scale_)


def run(name: str, device: torch.device, *args, **kwargs):
    """Function `name` of the implementation for `device`, on `args`, on
    that CUDA device (Triton launches on the current one)."""
    fn = getattr(implementation(device), name)
    guard = _backend.on_device(device)
    if guard is None:
        return fn(*args, **kwargs)
    with guard:
        return fn(*args, **kwargs)
