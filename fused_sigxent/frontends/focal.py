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
    alpha: float | Tensor = 0.25,
    gamma: float | Tensor = 2.0,
    reduction: str = "none",
    *,
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """`torchvision.ops.sigmoid_focal_loss` (Lin et al.), stable for every gamma >= 0.

    loss = alpha_t (1 - p_t)^gamma BCE(inputs, targets), alpha_t = alpha z + (1 - alpha)(1 - z)
    (alpha < 0: no alpha_t), times `weight` (broadcast to `inputs`), with z
    the smoothed target. alpha and gamma: numbers, or 0-d tensors (a
    schedule: data, so a new value recompiles nothing; a tensor alpha is in
    [0, 1]). `targets`: floating (soft), bool/uint8 (hard), or int64 class
    indices of shape `inputs.shape[:-1]` in [-1, C] (-1 and C: no positive,
    as padding and as background), read as one-hot rows without forming
    them; an index outside [-1, C] raises on CPU tensors and makes that
    row's loss NaN on the GPU (checking would synchronize). Reductions
    "none", "mean" (over numel), "sum"; the loss comes back in `inputs`'
    dtype, computed in float32.
    """
    options = (alpha, gamma, reduction, label_smoothing)
    if (isinstance(targets, Tensor) and targets.dtype == torch.int64 and targets.device.type == "cpu") or \
            isinstance(alpha, Tensor) or isinstance(gamma, Tensor):
        # Class indices on the CPU: their values are checked on every call,
        # which a call plan (keyed on the signature alone) would skip; and a
        # tensor alpha or gamma is this call's data, which a plan must not keep.
        return routes.sigmoid_ce(*_arguments(inputs, targets, weight, None, *options))
    return routes.loss(_arguments, inputs, targets, weight, None, *options)


def _arguments(inputs, targets, weight, _pos_weight, alpha, gamma, reduction, label_smoothing) -> tuple:
    """The checked arguments of `routes.sigmoid_ce`, with gamma and
    alpha where the loss is not the plain cross entropy."""
    x = checks.logits("inputs", inputs)
    g = _gamma(gamma, x)
    a = _alpha(alpha, x)
    z = _targets(targets, x)
    w = None if weight is None else checks.coefficient("weight", weight, x, "inputs")
    s = checks.label_smoothing(label_smoothing)
    code = reduction_code(reduction)
    alpha_or_none = a if isinstance(a, Tensor) or a >= 0 else None
    if not isinstance(g, Tensor) and g == 0 and alpha_or_none is None:
        # (1 - p_t)^0 alpha-free is the cross entropy itself: the same op, unchanged.
        return x, z, w, None, s, code, out_dtype(x)
    return x, z, w, None, s, code, out_dtype(x), g, alpha_or_none


def reduction_code(reduction) -> int:
    """The op's code for torchvision's reduction names, with torchvision's
    error for any other (its tests match "Invalid")."""
    if reduction not in R.TORCH_CODES:
        raise ValueError(f"Invalid Value for arg 'reduction': '{reduction}' \n Supported reduction modes: 'none', "
                         "'mean', 'sum'")
    return R.TORCH_CODES[reduction]


def _number(name: str, value) -> float | Tensor:
    """A real number (a Python int or float; not a bool), or a 0-d floating
    tensor. Under torch.compile a traced float (a symbol) passes as it is."""
    if isinstance(value, torch.SymFloat):
        return value
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise TypeError(f"{name} must be a real number or a 0-d floating tensor; got a tensor of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        if value.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad, but the focal loss takes it as data (no gradient flows "
                             f"to it): pass {name}.detach()")
        return value
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number (float) or a 0-d tensor; got {type(value).__name__}")
    return float(value)


def _tensor_check(name: str, value: Tensor, x: Tensor, ok: Tensor, message: str) -> Tensor:
    """A 0-d tensor on x's device whose value passed `ok`: checked here where
    that is free (a CPU tensor, eager), else on the device without a host
    sync (an out-of-range value stops the run)."""
    if value.device != x.device:
        if value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but inputs is on {x.device}")
        value = value.to(x.device, non_blocking=True)
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(f"{message}; got {value.item()}")
    else:
        torch._assert_async(ok.to(value.device), message)
    return value


def _gamma(gamma, x: Tensor) -> float | Tensor:
    g = _number("gamma", gamma)
    if isinstance(g, Tensor):
        return _tensor_check("gamma", g, x, (g >= 0) & g.isfinite(), "gamma must be a finite number >= 0")
    if not g >= 0.0 or g == float("inf"):
        raise ValueError(f"gamma must be a finite number >= 0; got {gamma}")
    return g


def _alpha(alpha, x: Tensor) -> float | Tensor:
    a = _number("alpha", alpha)
    if isinstance(a, Tensor):
        # No alpha_t (a negative alpha) is a host decision: a number's, not a tensor's.
        return _tensor_check("alpha", a, x, (a >= 0) & (a <= 1), "alpha as a tensor must be in [0, 1]")
    if not a <= 1.0:
        raise ValueError(f"alpha must be <= 1 (or negative for no alpha_t); got {alpha}")
    return a


def _targets(targets, x: Tensor) -> Tensor:
    """Targets of x's shape (floating, bool, uint8), or int64 class indices
    of shape x.shape[:-1], each in [-1, C]."""
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
        # A DTensor's every shard, on every rank (one id per row: small), so
        # that every rank raises alike.
        ids = t.full_tensor() if routes.is_dtensor(t) else t
        if ((ids < -1) | (ids > n_classes)).any():
            raise ValueError(
                f"class-index targets must be in [-1, {n_classes}] (-1 and {n_classes}: no positive); got values "
                f"from {int(ids.min())} to {int(ids.max())}"
            )
    return t


class SigmoidFocalLoss(nn.Module):
    """`sigmoid_focal_loss` as a module (torchvision's argument order; reduction
    "mean" by default, as torch.nn's losses). `weight` is a buffer."""

    def __init__(self, alpha: float | Tensor = 0.25, gamma: float | Tensor = 2.0, reduction: str = "mean",
                 weight: Tensor | None = None) -> None:
        super().__init__()
        self.alpha, self.gamma = _number("alpha", alpha), _number("gamma", gamma)
        if not isinstance(self.gamma, Tensor) and (not self.gamma >= 0.0 or self.gamma == float("inf")):
            raise ValueError(f"gamma must be a finite number >= 0; got {gamma}")
        if not isinstance(self.alpha, Tensor) and not self.alpha <= 1.0:
            raise ValueError(f"alpha must be <= 1 (or negative for no alpha_t); got {alpha}")
        reduction_code(reduction)
        if weight is not None and not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
        self.register_buffer("weight", weight)
        self.reduction = reduction

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return sigmoid_focal_loss(inputs, targets, self.alpha, self.gamma, self.reduction, weight=self.weight)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"
