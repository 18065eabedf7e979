"""SigLIP's pairwise sigmoid loss (open_clip's SigLipLoss, one device) on the
chunked engine (`impl/chunked.py`): the diagonal is the positive class."""

import torch
from torch import Tensor

from ..core import reduction as R
from ..core.dtypes import compute_dtype, number_as_tensor
from ..op import routes
from . import checks
from .linear import autocast_matmul_dtype, chunk_size_argument


def _scalar(name: str, value, x: Tensor, dtype: torch.dtype) -> Tensor:
    """A number, or a one-element tensor (0-d, as open_clip's parameters), as a 0-d tensor on x's device."""
    if checks.is_number(value) or isinstance(value, torch.SymFloat):
        return number_as_tensor(value, x, dtype)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a number or a 0-d tensor; got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"{name} must be a number or a 0-d tensor; got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be floating; got {value.dtype}")
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but image_features is on {x.device}")
    return value.reshape(())


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale,
    logit_bias,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """open_clip's `SigLipLoss` for one device, never holding the N x N logits:

    loss = -(1/N) sum_ij log sigmoid(l_ij (t <x_i, y_j> + b)), l_ii = 1, l_ij = -1 (i != j),

    with x = image_features (N, D), y = text_features (N, D), t = logit_scale
    (already exponentiated, as open_clip passes it) and b = logit_bias,
    numbers or 0-d tensors. Under torch.autocast the features' product runs
    in the autocast dtype, as a matmul's. Float32 loss (float64 for float64 features);
    gradients for both features, t and b, from the forward's one pass.
    """
    routes.refuse_unsupported_linear("siglip_loss", image_features, text_features, logit_scale, logit_bias)
    checks.logits("image_features", image_features)
    checks.tensor("text_features", text_features)
    x, y = autocast_matmul_dtype(image_features, text_features)
    for name, t in (("image_features", x), ("text_features", y)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, D); got shape {tuple(t.shape)}")
    if y.dtype != x.dtype:
        raise TypeError(f"text_features must have image_features' dtype {x.dtype}; got {y.dtype}")
    if y.shape != x.shape:
        raise ValueError(
            f"image_features and text_features must have the same shape (N, D); got {tuple(x.shape)} "
            f"and {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"text_features is on {y.device} but image_features is on {x.device}")
    ct = compute_dtype(x.dtype)
    t = _scalar("logit_scale", logit_scale, x, ct)
    b = _scalar("logit_bias", logit_bias, x, ct)
    rows = chunk_size_argument(chunk_size)
    smoothing = number_as_tensor(0.0, x, ct)
    return routes.linear_loss(x, y, b, t, None, None, None, smoothing, R.MEAN_BY_ROWS, rows)
