"""Call plans: a loss call in plain eager code, worked out once per call
signature and replayed.

A training loop calls its loss with the same kinds of arguments every step.
The first call of a signature goes the whole way: the front end's checks,
the op's choice of route and of the gradients the forward writes, the
launch plan of the kernel (or the implementation) it runs. What that
decided is kept as a `Plan`, keyed on everything it read: each tensor's
class, shape, strides, dtype, device, requires_grad and address alignment,
the front end's other arguments, the backend, grad mode and autocast. A
later call of that signature checks what could send it elsewhere (a mode, a
transform, the profiler, tracing, compiling; for CUDA tensors, the current
device and a graph capture) and applies the plan: the autograd Function's
C++ apply, the outputs' allocations and one launch. Anything else, or a
call whose checks convert an argument (an integer weight, a number), takes
`_op.sigmoid_ce`, the route that serves every case.
"""

import torch
from torch import Tensor

from . import _autograd, _backend, _dispatch, _op, _reference
from . import _reduction as R
from ._plans import PLANS, remember


def loss(prepare, logits, labels, weight, pos_weight, *options) -> Tensor:
    """The loss of `_op.sigmoid_ce(*prepare(logits, labels, weight,
    pos_weight, *options))`, where `prepare` is a front end's checks
    (raising before any computation, depending on nothing but the key's
    contents) returning the op's arguments, the tensors first. options: the
    front end's other arguments."""
    if not _unobserved():
        return _op.sigmoid_ce(*prepare(logits, labels, weight, pos_weight, *options))
    plan = None
    key = _key(prepare, logits, labels, weight, pos_weight, options)
    if key is not None:
        try:
            plan = PLANS.get(key)
        except TypeError:  # an unhashable option: the front end's checks say what it should be
            key = None
        if plan is not None and plan.here():
            return _apply(logits, labels, weight, pos_weight, plan)
    args = prepare(logits, labels, weight, pos_weight, *options)
    return _call(args, key if plan is None else None, (logits, labels, weight, pos_weight))


def call(args: tuple) -> Tensor:
    """The loss of `_op.sigmoid_ce(*args)` (arguments a front end checked on
    this very call): in plain eager code through a plan made for it alone."""
    if not _unobserved():
        return _op.sigmoid_ce(*args)
    return _call(args, None, ())


def _call(args: tuple, key: tuple | None, given: tuple) -> Tensor:
    """The loss of op arguments `args`; the plan made for them is kept under
    `key` where they are the call's own tensors (`given`), and NOT_PLANNED
    where they never can be (converted; not plain eager code)."""
    x, z, w, p = tensors = args[:4]
    plain = _dispatch.plain_eager(x.device, tensors)
    own = plain and len(given) == 4 and all(a is b for a, b in zip(tensors, given))
    if key is not None and not own:
        remember(key, NOT_PLANNED)
    if not (plain and _runs_here(_cuda_index(x.device))):  # (another current device, a capture: the op's route)
        return _op.sigmoid_ce(*args)
    plan = Plan(*args)
    if key is not None and own:
        remember(key, plan)
    return _apply(x, z, w, p, plan)


def _key(prepare, logits, labels, weight, pos_weight, options) -> tuple | None:
    """The call's signature, or None where it has none (its arguments are
    not what they should be: the front end's checks then say what is
    wrong). Each option's class too: True == 1.0 and Decimal("0.5") == 0.5,
    but only the float passes the checks."""
    try:
        return (prepare, options, tuple(map(type, options)), _backend.backend(), _grad_enabled(),
                _any_autocast() and torch.is_autocast_enabled(logits.device.type),
                _signature(logits), _signature(labels), _signature(weight), _signature(pos_weight))
    except Exception:  # not a tensor, a tensor without storage (a functorch wrapper), a bad backend name
        return None


def _signature(t: Tensor | None) -> tuple | None:
    # The class: a subclass (DTensor, a wrapper) is never planned. The
    # address modulo 16: Triton specializes on it; and a tensor with no
    # storage (a functorch wrapper left by a finished transform) raises.
    if t is None:
        return None
    return t.__class__, t.shape, t.stride(), t.dtype, t.device, t.requires_grad, t.data_ptr() % 16


_apply = _autograd.apply_plain  # (logits, labels, weight, pos_weight, plan) -> loss
_unobserved = _dispatch.unobserved
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_grad_enabled = torch.is_grad_enabled
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


class _NotPlanned:
    """A signature no kept plan serves (its checks convert an argument, or the
    call is not plain eager code): its calls get a plan of their own each."""

    @staticmethod
    def here() -> bool:
        return False


NOT_PLANNED = _NotPlanned()


def _cuda_index(device: torch.device) -> int | None:
    return device.index if device.type == "cuda" else None


def _runs_here(cuda_index: int | None) -> bool:
    """Whether a plan made for CUDA device `cuda_index` (None: not CUDA) may
    run now. Triton launches on the current device, which a plan assumes is
    its tensors'; a CUDA graph capture must allocate nothing that a plan
    would keep, and its own workspace is chosen per launch."""
    return cuda_index is None or (cuda_index == torch.cuda.current_device()
                                  and not torch.cuda.is_current_stream_capturing())


class Plan:
    """One signature's call, as `_autograd._PlainSigmoidCE` applies it: its
    `forward(logits, labels, weight, pos_weight)` returns the op's
    (loss, denominator, grad_logits, grad_labels)."""

    __slots__ = ("forward", "smoothing", "reduction", "out_dtype", "focal", "grads_in_forward", "cuda_index",
                 "scale_impl", "backend")

    def __init__(self, x, z, w, p, label_smoothing, reduction, out_dtype, gamma=None, alpha=None):
        self.smoothing, self.focal = _op.scalar_arguments(x, z, label_smoothing, gamma, alpha)
        self.reduction, self.out_dtype = reduction, out_dtype
        grads = _autograd.plan_grads_in_forward(x, z, w, reduction)
        self.grads_in_forward = grads[0] or grads[1]
        self.cuda_index = _cuda_index(x.device)
        self.forward = _forward(x, z, w, p, self.smoothing, reduction, out_dtype, grads, self.focal)
        self.scale_impl = _dispatch.implementation("sigmoid_ce_scale_", x.device)
        self.backend = _backend.backend()

    def here(self) -> bool:
        """Whether this plan may serve a call now (see `_runs_here`)."""
        return self.cuda_index is None or _runs_here(self.cuda_index)

    def scale(self, grad: Tensor, grad_logits: Tensor, grad_labels: Tensor) -> None:
        """`_autograd.scale` of gradients this plan's forward wrote: straight
        to the implementation while nothing could observe the call (a mode
        or the profiler may have been turned on since the forward, or the
        backend changed)."""
        if (grad.__class__ is Tensor and _unobserved() and self.here() and _backend.backend() == self.backend
                and not _wrapped(grad)):
            self.scale_impl(grad, grad_logits, grad_labels)
        else:
            _autograd.scale(grad, grad_logits, grad_labels)


def _forward(x, z, w, p, smoothing, reduction, out_dtype, grads, focal):
    """The forward of calls of x, z, w, p's signature: the kernel's launch
    plan, or the implementation the dispatcher would run."""
    device = x.device
    if not _backend.use_kernels(device):
        impl = _dispatch.implementation("sigmoid_ce_fwd", device)
        return lambda x, z, w, p: impl(x, z, w, p, smoothing, reduction, out_dtype, *grads, *focal)
    from .kernels import _layout
    from .kernels import sigmoid_ce_fwd as kernel

    contiguous = _layout.contiguous
    cx, cz = contiguous(x), contiguous(z)
    gamma, alpha, hard_labels = (*focal, None, None, False)[:3]
    launch = kernel.plan(cx, cz, z.dtype, w, p, smoothing, reduction, out_dtype, *grads, gamma, alpha, hard_labels)
    # A denominator that depends on the shape alone is the same every call:
    # the plan's own, rewritten by every launch (an allocation saved).
    denom = None
    if R.denominator_is_constant(reduction):
        with torch.inference_mode(False):
            denom = torch.empty((), dtype=_reference.compute_dtype(x.dtype), device=device)
    if cx is x and cz is z:
        return lambda x, z, w, p: launch(x, z, w, p, smoothing, gamma, alpha, None, denom, False)
    return lambda x, z, w, p: launch(contiguous(x), contiguous(z), w, p, smoothing, gamma, alpha, None, denom,
                                             False)
