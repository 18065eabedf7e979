"""Fused sigmoid cross entropy (BCE with logits) for PyTorch: TF semantics, Triton kernels."""

from . import _op  # noqa: F401  (registers torch.ops.fused_sigxent)
from ._focal import SigmoidFocalLoss, sigmoid_focal_loss
from ._linear import linear_sigmoid_cross_entropy
from ._reduction import Reduction
from ._siglip import siglip_loss
from ._tf_api import (
    deprecated_flipped_sigmoid_cross_entropy_with_logits,
    sigmoid_cross_entropy,
    sigmoid_cross_entropy_with_logits,
    weighted_cross_entropy_with_logits,
)
from ._torch_api import BCEWithLogitsLoss, binary_cross_entropy_with_logits

__all__ = [
    "BCEWithLogitsLoss",
    "Reduction",
    "SigmoidFocalLoss",
    "binary_cross_entropy_with_logits",
    "deprecated_flipped_sigmoid_cross_entropy_with_logits",
    "linear_sigmoid_cross_entropy",
    "sigmoid_cross_entropy",
    "sigmoid_cross_entropy_with_logits",
    "sigmoid_focal_loss",
    "siglip_loss",
    "weighted_cross_entropy_with_logits",
]
__version__ = "0.1.0"
