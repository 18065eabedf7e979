"""`fs.patch()`: code that is not edited (nn.BCEWithLogitsLoss, a library's
model) computes its loss with this package: PyTorch's
`binary_cross_entropy_with_logits` and, where torchvision is installed, its
`sigmoid_focal_loss`, replaced by checking wrappers, restored by `fs.unpatch()`."""

import functools
import importlib
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Parameter

from ..core.dtypes import BYTE_LABEL_DTYPES, LOGITS_DTYPES
from ..op.routes import is_dtensor
from .focal import sigmoid_focal_loss
from .torch_api import binary_cross_entropy_with_logits

# {(module, attribute): the original}, for what is patched now.
_ORIGINALS: dict[tuple[object, str], object] = {}


class Patched:
    """What `patch()` returns: as a context manager, it restores on exit what
    that call replaced (nothing, if it was patched already)."""

    def __init__(self, replaced: list[tuple[object, str]]):
        self.replaced = replaced

    def __enter__(self) -> "Patched":
        return self

    def __exit__(self, *exc) -> None:
        for key in self.replaced:
            original = _ORIGINALS.pop(key, None)
            if original is not None:
                setattr(*key, original)


def patch() -> Patched:
    """Routes `torch.nn.functional.binary_cross_entropy_with_logits` (so
    `nn.BCEWithLogitsLoss` and every library that calls either) and, where
    torchvision is installed, `torchvision.ops.sigmoid_focal_loss`, to this
    package. A call with arguments the package does not take (the legacy
    `size_average`/`reduce`, an integer input, shapes or devices that do not
    match) goes to the original, unchanged. Code that bound the function to a
    name of its own before the patch (`from torch.nn.functional import
    binary_cross_entropy_with_logits`) keeps the original. Idempotent;
    `unpatch()`, or leaving `with fs.patch():`, restores the originals."""
    targets = [(F, "binary_cross_entropy_with_logits", _bce_with_logits)]
    targets += [(module, "sigmoid_focal_loss", _sigmoid_focal_loss) for module in _torchvision_ops()]
    replaced = []
    for module, name, wrap in targets:
        key = (module, name)
        if key not in _ORIGINALS:
            _ORIGINALS[key] = original = getattr(module, name)
            setattr(module, name, functools.wraps(original)(wrap(original)))
            replaced.append(key)
    return Patched(replaced)


def unpatch() -> None:
    """Restores every original `patch()` replaced."""
    while _ORIGINALS:
        (module, name), original = _ORIGINALS.popitem()
        setattr(module, name, original)


def _torchvision_ops() -> list:
    """torchvision's modules that hold `sigmoid_focal_loss`, where it is
    installed and imports (a torchvision built for another torch does not)."""
    if importlib.util.find_spec("torchvision") is None:
        return []
    try:
        return [importlib.import_module("torchvision.ops"), importlib.import_module("torchvision.ops.focal_loss")]
    except Exception:  # installed, but not importable beside this torch
        return []


def _plain(t) -> bool:
    return t.__class__ is Tensor or t.__class__ is Parameter or is_dtensor(t)


def _coefficient_taken(c, x: Tensor) -> bool:
    """None, or a real tensor on x's device that broadcasts to x (NumPy rules)
    and whose dtype PyTorch would not promote the loss to."""
    if c is None:
        return True
    return (_plain(c) and not c.is_complex() and c.device == x.device and c.dim() <= x.dim()
            and torch.promote_types(x.dtype, c.dtype) == x.dtype
            and all(a == 1 or a == b for a, b in zip(reversed(c.shape), reversed(x.shape))))


def _taken(x, z) -> bool:
    """Logits and labels this package takes: floating logits of its dtypes,
    labels of their shape (floating, bool or uint8), on one device. PyTorch
    returns its loss in the promoted dtype of input and target: a target of
    a wider dtype goes to PyTorch, whose dtype this package would not keep."""
    return (_plain(x) and x.dtype in LOGITS_DTYPES and isinstance(z, Tensor) and _plain(z)
            and z.shape == x.shape and z.device == x.device
            and (z.is_floating_point() or z.dtype in BYTE_LABEL_DTYPES)
            and torch.promote_types(x.dtype, z.dtype) == x.dtype)


def _bce_with_logits(original):
    """PyTorch's function, as this package's where it takes the arguments."""

    def binary_cross_entropy_with_logits_(input, target, weight=None, size_average=None, reduce=None,
                                          reduction="mean", pos_weight=None):
        if (size_average is None and reduce is None and reduction in ("none", "mean", "sum")
                and _taken(input, target) and _coefficient_taken(weight, input)
                and _coefficient_taken(pos_weight, input) and not torch.jit.is_scripting()):
            return binary_cross_entropy_with_logits(input, target, weight, reduction, pos_weight)
        return original(input, target, weight, size_average, reduce, reduction, pos_weight)

    return binary_cross_entropy_with_logits_


def _scalar_taken(value) -> bool:
    """A real number, or a 0-d floating tensor that requires no gradient."""
    if isinstance(value, Tensor):
        return value.dim() == 0 and value.is_floating_point() and not value.requires_grad
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sigmoid_focal_loss(original):
    """torchvision's function, as this package's where it takes the arguments."""

    def sigmoid_focal_loss_(inputs, targets, alpha=0.25, gamma=2, reduction="none"):
        if (reduction in ("none", "mean", "sum") and _taken(inputs, targets) and _scalar_taken(alpha)
                and _scalar_taken(gamma)):
            return sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction)
        return original(inputs, targets, alpha, gamma, reduction)

    return sigmoid_focal_loss_
