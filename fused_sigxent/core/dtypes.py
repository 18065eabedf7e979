"""Dtype rules: which dtypes the loss reads, the dtype it computes and returns
in, and Python numbers as 0-d tensors."""

import functools

import torch
from torch import Tensor

LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Hard labels read as one byte each: the kernels load them as they are.
BYTE_LABEL_DTYPES = (torch.bool, torch.uint8)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 math for float64 logits, float32 math for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def out_dtype(x: Tensor) -> torch.dtype:
    """The loss dtype: the logits', except under autocast, where PyTorch's own
    loss runs (and returns) float32 for half-precision logits."""
    if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        return torch.float32
    return x.dtype


def number_as_tensor(value, x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A Python number as a 0-d tensor on x's device, made once per (value,
    dtype, device) so a call with pos_weight=3.0 launches no fill kernel of
    its own. A fill, not a host-to-device copy: safe in a CUDA graph capture.
    Under torch.compile the fill is traced instead (Inductor folds it, Dynamo
    does not trace through caches, and a float traced as a symbol stays one).
    Inside a CUDA graph capture it is made anew: a tensor made there is filled
    only when the graph replays and lives in the graph's pool, so it must
    never be cached for eager calls. So it is under a dispatch mode or a
    torch.func transform: what they make (a fake tensor, a functorch wrapper)
    has no storage once they end."""
    # is_compiling first: Dynamo cannot trace is_current_stream_capturing
    # (torch 2.11 breaks the graph there).
    if (torch.compiler.is_compiling() or _dispatch_modes() or _transforms()
            or (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
        return torch.full((), value, dtype=dtype, device=x.device)
    return _constant(float(value), dtype, x.device)


_dispatch_modes = torch._C._len_torch_dispatch_stack
_transforms = torch._C._are_functorch_transforms_active


@functools.lru_cache(maxsize=64)
def _constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Never an inference tensor (a first call under inference_mode, say an
    # evaluation pass): training calls save it for backward.
    with torch.inference_mode(False):
        return torch.full((), value, dtype=dtype, device=device)
