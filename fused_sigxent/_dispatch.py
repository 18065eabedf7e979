"""How a call reaches an op's implementation: through the dispatcher, or, in
plain eager code, straight to the function the dispatcher would run."""

import functools
import importlib

import torch
from torch import Tensor
from torch.nn import Parameter

from . import _backend, _cpu, _reference

_DEVICES = ("cpu", "cuda")


def implementation(name: str, device: torch.device):
    """The function that runs op `name` on `device`: a Triton launcher, the
    CPU path (`auto` on CPU tensors), or the reference (the definition)."""
    if _backend.use_kernels(device):
        # Imported on first use: Triton reads TRITON_INTERPRET when a kernel is
        # decorated, so importing late lets a process choose it before the first call.
        return _launcher(name)
    if device.type == "cpu" and _backend.backend() == "auto":
        return getattr(_cpu, name)
    return getattr(_reference, name)


@functools.cache
def _launcher(name: str):
    return getattr(importlib.import_module(f"fused_sigxent.kernels.{name.rstrip('_')}"), name)


def run(name: str, device: torch.device, *args, **kwargs):
    """Op `name`'s implementation on `args` (`kwargs`: an implementation's
    own options), as the registered op runs it."""
    impl = implementation(name, device)
    guard = _backend.on_device(device)
    if guard is None:
        return impl(*args, **kwargs)
    with guard:
        return impl(*args, **kwargs)


def call(name: str, device: torch.device, *args):
    """Op `name` on `args`, from eager code (an autograd.Function's forward
    or backward). Where nothing could observe or transform the call (no
    dispatch or function mode, functorch transform, tensor subclass, profiler
    or unusual device) the dispatcher's layers would only add time (the
    custom-op and dynamo-disable wrappers: ~80 us a training step on a
    2-core CPU, about 3 times PyTorch eager's whole step), so the
    implementation runs directly.
    Everywhere else the registered op runs, so that a mode, a transform or a
    profile sees `fused_sigxent::<name>`."""
    if plain_eager(device, args):
        return run(name, device, *args)
    return getattr(torch.ops.fused_sigxent, name)(*args)


def plain_eager(device: torch.device, args) -> bool:
    """Whether a call on `args` (its tensors at least: other values pass)
    can skip the dispatcher (see `call`). Called on every call of the op's
    route (and when a call plan is made, `_eager`), so kept to a few
    C-level checks; compiling comes first, where Dynamo folds it and reads
    no further."""
    if not unobserved() or device.type not in _DEVICES:
        return False
    for a in args:
        cls = a.__class__
        if cls is Tensor or cls is Parameter:
            if _wrapped(a):  # a dead functorch wrapper, left by a finished transform
                return False
        elif isinstance(a, Tensor):
            return False
    return True


def unobserved() -> bool:
    """No dispatch or function mode, functorch transform, profiler, trace or
    compile could see or change a call now (its tensors aside)."""
    return not (torch.compiler.is_compiling()  # first: Dynamo folds it and reads no further
                or _dispatch_modes() or _function_modes() or _transforms() or _profiling() or _tracing())


_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_transforms = torch._C._are_functorch_transforms_active
_profiling = torch.autograd._profiler_enabled
_tracing = torch._C._is_tracing
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
