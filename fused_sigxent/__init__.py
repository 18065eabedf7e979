"""Fused sigmoid cross entropy (BCE with logits) for PyTorch: TF semantics, Triton kernels.

Layers, each importing only those below it (docs/design.md):
  frontends/  the public functions and modules: argument checks, no math
  op/         the registered ops, their derivatives, and the route table
  impl/       the implementations: reference, CPU path, chunked engine
              (the Triton kernels are `fused_sigxent.kernels`)
  core/       reduction codes, dtype rules, the plan store, the broadcast layout
"""

from .frontends.focal import SigmoidFocalLoss, sigmoid_focal_loss
from .frontends.linear import linear_sigmoid_cross_entropy
from .frontends.patch import patch, unpatch
from .frontends.siglip import SigLipLoss, siglip_loss
from .frontends.tf_api import (
    deprecated_flipped_sigmoid_cross_entropy_with_logits,
    sigmoid_cross_entropy,
    sigmoid_cross_entropy_with_logits,
    weighted_cross_entropy_with_logits,
)
from .frontends.torch_api import BCEWithLogitsLoss, binary_cross_entropy_with_logits
from .core.reduction import Reduction

__all__ = [
    "BCEWithLogitsLoss",
    "Reduction",
    "SigLipLoss",
    "SigmoidFocalLoss",
    "binary_cross_entropy_with_logits",
    "deprecated_flipped_sigmoid_cross_entropy_with_logits",
    "linear_sigmoid_cross_entropy",
    "sigmoid_cross_entropy",
    "sigmoid_cross_entropy_with_logits",
    "sigmoid_focal_loss",
    "siglip_loss",
    "patch",
    "unpatch",
    "weighted_cross_entropy_with_logits",
]
__version__ = "0.1.0"
