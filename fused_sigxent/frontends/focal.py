"""Sigmoid focal loss front ends: drop-ins for torchvision.ops.sigmoid_focal_loss, on the same op as the BCE loss."""

import numbers

import torch
from torch import Tensor, nn

from ..core import reduction as R
from ..core.dtypes import out_dtype
from ..op import routes
from . import checks


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """`torchvision.ops.sigmoid_focal_loss` (Lin et al.), stable for every gamma >= 0.

    loss = alpha_t (1 - p_t)^gamma BCE(inputs, targets), alpha_t = alpha z + (1 - alpha)(1 - z)
    (alpha < 0: no alpha_t), times `weight` (broadcast to `inputs`), with z
    the smoothed target. `targets`: floating (soft), bool/uint8 (hard), or
    int64 class indices of shape `inputs.shape[:-1]` in [0, C] (C: background,
    no positive), read as one-hot rows without forming them; an index outside
    [0, C] raises on CPU tensors and makes that row's loss NaN on the GPU
    (checking would synchronize). Reductions "none", "mean" (over numel),
    "sum"; the loss comes back in `inputs`' dtype, computed in float32.
    """
    options = (alpha, gamma, reduction, label_smoothing)
    if isinstance(targets, Tensor) and targets.dtype == torch.int64 and targets.device.type == "cpu":
        # Class indices on the CPU: their values are checked on every call,
        # which a call plan (keyed on the signature alone) would skip.
        return routes.sigmoid_ce(*_arguments(inputs, targets, weight, None, *options))
    return routes.loss(_arguments, inputs, targets, weight, None, *options)


def _arguments(inputs, targets, weight, _pos_weight, alpha, gamma, reduction, label_smoothing) -> tuple:
    """The checked arguments of `routes.sigmoid_ce`, with gamma and
    alpha where the loss is not the plain cross entropy."""
    x = checks.logits("inputs", inputs)
    g = _number("gamma", gamma)
    if not g >= 0.0 or g == float("inf"):
        raise ValueError(f"gamma must be a finite number >= 0; got {gamma}")
    a = _number("alpha", alpha)
    if not a <= 1.0:
        raise ValueError(f"alpha must be <= 1 (or negative for no alpha_t); got {alpha}")
    z = _targets(targets, x)
    w = None if weight is None else checks.coefficient("weight", weight, x, "inputs")
    s = checks.label_smoothing(label_smoothing)
    code = R.torch_code(reduction)
    alpha_or_none = a if a >= 0 else None
    if g == 0 and alpha_or_none is None:
        # (1 - p_t)^0 alpha-free is the cross entropy itself: the same op, unchanged.
        return x, z, w, None, s, code, out_dtype(x)
    return x, z, w, None, s, code, out_dtype(x), g, alpha_or_none


def _number(name: str, value) -> float:
    """A real number (a Python int or float; not a bool or a tensor). Under
    torch.compile a traced float (a symbol) passes as it is."""
    if isinstance(value, torch.SymFloat):
        return value
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number (float); got {type(value).__name__}")
    return float(value)


def _targets(targets, x: Tensor) -> Tensor:
    """Targets of x's shape (floating, bool, uint8), or int64 class indices
    of shape x.shape[:-1], each in [0, C]."""
    t = checks.tensor("targets", targets)
    if t.dtype != torch.int64:
        return checks.labels("targets", t, x, "inputs")
    if x.dim() == 0 or t.shape != x.shape[:-1]:
        raise ValueError(
            f"int64 class-index targets must have the shape of inputs without its last dimension; got targets "
            f"{tuple(t.shape)} and inputs {tuple(x.shape)}"
        )
    if t.device != x.device:
        raise ValueError(f"targets is on {t.device} but inputs is on {x.device}")
    if t.device.type == "cpu" and not torch.compiler.is_compiling() and t.numel():
        # Free on CPU tensors; on CUDA it would synchronize, so the kernels
        # make such a row's loss NaN instead.
        n_classes = x.shape[-1]
        bad = (t < 0) | (t > n_classes)
        if bad.any():
            raise ValueError(
                f"class-index targets must be in [0, {n_classes}] ({n_classes}: background); got "
                f"{t[bad][0].item()}"
            )
    return t


class SigmoidFocalLoss(nn.Module):
    """`sigmoid_focal_loss` as a module (torchvision's argument order; reduction
    "mean" by default, as torch.nn's losses). `weight` is a buffer."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean",
                 weight: Tensor | None = None) -> None:
        super().__init__()
        self.alpha, self.gamma = _number("alpha", alpha), _number("gamma", gamma)
        if not self.gamma >= 0.0 or self.gamma == float("inf"):
            raise ValueError(f"gamma must be a finite number >= 0; got {gamma}")
        if not self.alpha <= 1.0:
            raise ValueError(f"alpha must be <= 1 (or negative for no alpha_t); got {alpha}")
        R.torch_code(reduction)
        if weight is not None and not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
        self.register_buffer("weight", weight)
        self.reduction = reduction

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return sigmoid_focal_loss(inputs, targets, self.alpha, self.gamma, self.reduction, weight=self.weight)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"
