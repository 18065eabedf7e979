"""Argument checks shared by the front ends; each raises before any computation
and names the argument, shape, dtype or device at fault."""

import numbers

import torch
from torch import Tensor

from ..core import backend as _backend
from ..core.dtypes import BYTE_LABEL_DTYPES, LOGITS_DTYPES


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
    same_device(name, z, x, x_name)
    if z.is_floating_point() or z.dtype in BYTE_LABEL_DTYPES:
        return z
    if cast_integers and not z.is_complex():
        return z.to(x.dtype)
    allowed = "a floating dtype, bool or uint8" + (" or an integer dtype" if cast_integers else "")
    raise TypeError(f"{name} must have {allowed}; got {z.dtype}")


def same_device(name: str, t: Tensor, x: Tensor, x_name: str) -> None:
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
    same_device(name, t, x, x_name)
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t


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
