"""Argument checks shared by the front ends; each raises before any computation
and names the argument, shape, dtype or device at fault."""

import functools
import numbers

import torch
from torch import Tensor

from . import _backend

try:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.experimental import implicit_replication as _implicit_replication
except ImportError:  # a torch built without distributed support
    DTensor = None

LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Hard labels read as one byte each: the kernels load them as they are.
BYTE_LABEL_DTYPES = (torch.bool, torch.uint8)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(name: str, value) -> Tensor:
    """`value` itself, if it is a tensor."""
    if value is None:
        raise ValueError(f"{name} must be a tensor, got None")
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def logits(name: str, value) -> Tensor:
    """A floating tensor of a dtype the kernels compute in."""
    x = tensor(name, value)
    if x.dtype not in LOGITS_DTYPES:
        raise TypeError(f"{name} must have dtype {_dtype_names(LOGITS_DTYPES)}; got {x.dtype}")
    _backend.check(x.device)
    return x


def labels(name: str, value, x: Tensor, x_name: str, *, cast_integers: bool = False) -> Tensor:
    """Labels of x's shape: floating, bool or uint8 (read as they are), or,
    with `cast_integers` (TF's tf.losses casts), other integers cast to x's dtype."""
    z = tensor(name, value)
    if z.shape != x.shape:
        raise ValueError(
            f"{name} and {x_name} must have the same shape; got {name} {tuple(z.shape)} "
            f"and {x_name} {tuple(x.shape)}"
        )
    _same_device(name, z, x, x_name)
    if z.is_floating_point() or z.dtype in BYTE_LABEL_DTYPES:
        return z
    if cast_integers and not z.is_complex():
        return z.to(x.dtype)
    allowed = "a floating dtype, bool or uint8" + (" or an integer dtype" if cast_integers else "")
    raise TypeError(f"{name} must have {allowed}; got {z.dtype}")


def _same_device(name: str, t: Tensor, x: Tensor, x_name: str) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}")


def coefficient(name: str, value, x: Tensor, x_name: str) -> Tensor:
    """A weight or pos_weight tensor that broadcasts to x's shape (NumPy rules),
    on x's device. Integer and bool coefficients become float32 (they are small
    or rare, and cannot require grad); a 0-d CPU tensor moves to x's device."""
    t = tensor(name, value)
    if t.is_complex():
        raise TypeError(f"{name} must be a real tensor; got {t.dtype}")
    # NumPy's rule, one way: every trailing dimension of t is 1 or x's own.
    # (torch.broadcast_shapes says the same at several times the host cost.)
    ok = t.dim() <= x.dim() and all(a == 1 or a == b for a, b in zip(reversed(t.shape), reversed(x.shape)))
    if not ok:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} does not broadcast to {x_name} of shape {tuple(x.shape)}"
        )
    if t.dim() == 0 and t.device != x.device and t.device.type == "cpu":
        t = t.to(x.device, non_blocking=True)
    _same_device(name, t, x, x_name)
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t


def number_as_tensor(value, x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A Python number as a 0-d tensor on x's device, made once per (value,
    dtype, device) so a call with pos_weight=3.0 launches no fill kernel of
    its own. A fill, not a host-to-device copy: safe in a CUDA graph capture.
    Under torch.compile the fill is traced instead (Inductor folds it, Dynamo
    does not trace through caches, and a float traced as a symbol stays one).
    Inside a CUDA graph capture it is made anew: a tensor made there is filled
    only when the graph replays and lives in the graph's pool, so it must
    never be cached for eager calls."""
    # is_compiling first: Dynamo cannot trace is_current_stream_capturing
    # (torch 2.11 breaks the graph there).
    if torch.compiler.is_compiling() or (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.full((), value, dtype=dtype, device=x.device)
    return _constant(float(value), dtype, x.device)


@functools.lru_cache(maxsize=64)
def _constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Never an inference tensor (a first call under inference_mode, say an
    # evaluation pass): training calls save it for backward.
    with torch.inference_mode(False):
        return torch.full((), value, dtype=dtype, device=device)


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def label_smoothing(value):
    """A real number in [0, 1]. Under torch.compile a float that Dynamo traces
    as a symbol (a smoothing schedule) is checked at run time instead, so a
    new value does not recompile."""
    if value.__class__ is float and 0.0 <= value <= 1.0:  # the common case, at once
        return value
    if isinstance(value, torch.SymFloat):
        torch._check(value >= 0.0, lambda: "label_smoothing must be in [0, 1]")
        torch._check(value <= 1.0, lambda: "label_smoothing must be in [0, 1]")
        return value
    if not is_number(value):
        raise TypeError(f"label_smoothing must be a real number in [0, 1]; got {type(value).__name__}")
    s = float(value)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1]; got {value}")
    return s


def not_scripted() -> None:
    """TorchScript would bake this call's Python decisions (whether the
    forward writes the gradient, the backend) into a graph that later runs
    with other inputs: refuse it by name rather than trace a wrong graph."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        raise RuntimeError(
            "fused_sigxent does not support TorchScript (torch.jit.trace / torch.jit.script); "
            "use torch.export or torch.compile instead"
        )


def is_dtensor(*tensors) -> bool:
    """Whether any argument is a DTensor (torch.distributed.tensor)."""
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def implicit_replication():
    """The DTensor context in which plain 0-d tensors (the smoothing, the
    denominator's constants) count as replicated."""
    return _implicit_replication()


def out_dtype(x: Tensor) -> torch.dtype:
    """The loss dtype: the logits', except under autocast, where PyTorch's own
    loss runs (and returns) float32 for half-precision logits."""
    if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        return torch.float32
    return x.dtype
