"""PyTorch-style front ends: drop-ins for F.binary_cross_entropy_with_logits and nn.BCEWithLogitsLoss."""

from torch import Tensor, nn

from ..core import reduction as R
from ..core.dtypes import out_dtype
from ..op import routes
from . import checks


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
    *,
    label_smoothing: float = 0.0,
) -> Tensor:
    """`torch.nn.functional.binary_cross_entropy_with_logits`, plus label smoothing.

    Same results as PyTorch's when `label_smoothing=0` ("mean" divides by
    numel; an empty "mean" is NaN), computed in float32 and returned in
    `input`'s dtype; `target` may also be bool or uint8.
    """
    return routes.loss(_arguments, input, target, weight, pos_weight, reduction, label_smoothing)


def _arguments(input, target, weight, pos_weight, reduction, label_smoothing) -> tuple:
    """The checked arguments of `routes.sigmoid_ce`."""
    x, z, w, p = _tensors(input, target, weight, pos_weight)
    s = checks.label_smoothing(label_smoothing)
    return x, z, w, p, s, R.torch_code(reduction), out_dtype(x)


def _tensors(input, target, weight, pos_weight):
    x = checks.logits("input", input)
    z = checks.labels("target", target, x, "input")
    w = None if weight is None else checks.coefficient("weight", weight, x, "input")
    p = None if pos_weight is None else checks.coefficient("pos_weight", pos_weight, x, "input")
    return x, z, w, p


class BCEWithLogitsLoss(nn.Module):
    """`torch.nn.BCEWithLogitsLoss`, plus label smoothing. `weight` and
    `pos_weight` are buffers under those names, so a state dict of PyTorch's
    module loads into this one and back."""

    def __init__(
        self,
        weight: Tensor | None = None,
        reduction: str = "mean",
        pos_weight: Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        R.torch_code(reduction)
        for name, value in (("weight", weight), ("pos_weight", pos_weight)):
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = reduction
        self.label_smoothing = checks.label_smoothing(label_smoothing)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return binary_cross_entropy_with_logits(
            input, target, self.weight, reduction=self.reduction, pos_weight=self.pos_weight,
            label_smoothing=self.label_smoothing,
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"
