"""SigLIP's pairwise sigmoid loss (open_clip's SigLipLoss, one device) on the
chunked engine (`impl/chunked.py`): the diagonal is the positive class."""

import torch
import torch.distributed as dist
from torch import Tensor, nn

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
    group=None,
) -> Tensor:
    """open_clip's `SigLipLoss`, never holding the N x N logits:

    loss = -(1/n) sum_{i local} sum_{j} log sigmoid(l_ij (t <x_i, y_j> + b)), l_ij = 1 for the
    matching pair, -1 otherwise,

    with x = image_features (n, D), y = text_features (n, D), t = logit_scale
    (already exponentiated, as open_clip passes it) and b = logit_bias,
    numbers or 0-d tensors (None: no bias). Without `group` (or a group of
    one rank) j runs over this call's n rows. With `group` (a
    torch.distributed process group), over the global batch: every rank
    passes its own n rows (n equal on every rank, else a ValueError on every
    rank) and gets open_clip's `SigLipLoss(rank=r, world_size=W)` value; its
    text features get the gradient of every rank's loss, each scaled by that
    rank's incoming gradient. Under torch.autocast the features' product
    runs in the autocast dtype, as a matmul's. Float32 loss (float64 for
    float64 features); gradients for both features, t and b.
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
    b = None if logit_bias is None else _scalar("logit_bias", logit_bias, x, ct)
    rows = chunk_size_argument(chunk_size)
    smoothing = number_as_tensor(0.0, x, ct)
    return routes.siglip_loss(x, y, t, b, smoothing, rows, group)


# open_clip's exchange strategies: this package's ring serves each of them.
DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


class DistImplError(ValueError, AssertionError):
    """An unknown `dist_impl`: open_clip asserts, so both kinds catch it."""


class SigLipLoss(nn.Module):
    """open_clip's `SigLipLoss` (constructor and forward): the SigLIP loss of
    `siglip_loss`, over the default process group's global batch where
    `world_size > 1`, by this package's ring whatever `dist_impl` says
    (validated as open_clip does). `bidir`, open_clip's older keyword, is
    accepted and ignored; `cache_labels` too (no labels are made)."""

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None,
                 chunk_size: int = 0, bidir: bool | None = None) -> None:
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in DIST_IMPLS:
            raise DistImplError(f"dist_impl must be one of {', '.join(DIST_IMPLS)}; got {dist_impl!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
            raise ValueError(f"chunk_size must be an int >= 0 (0: chosen from the sizes); got {chunk_size!r}")
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl, self.chunk_size, self.bidir = dist_impl, chunk_size, bidir

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                output_dict: bool = False):
        group = None
        if self.world_size > 1:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(f"SigLipLoss(world_size={self.world_size}) needs torch.distributed initialized "
                                   "(init_process_group) before its forward")
            if (dist.get_rank(), dist.get_world_size()) != (self.rank, self.world_size):
                raise ValueError(
                    f"SigLipLoss(rank={self.rank}, world_size={self.world_size}) runs in rank "
                    f"{dist.get_rank()} of a default group of {dist.get_world_size()}")
            group = dist.group.WORLD
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias,
                           chunk_size=self.chunk_size or None, group=group)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}, chunk_size={self.chunk_size}"
