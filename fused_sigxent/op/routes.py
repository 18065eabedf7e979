"""Which route a loss call takes: the route table, the one predicate that
says whether anything observes a call, and the call plans of the planned
route.

Every loss front end (torch, TF, focal) hands its checks and arguments to
`loss`; the first row of `ROUTES` whose test holds runs the call:

| route        | taken when                                        | runs                                          |
| ------------ | ------------------------------------------------- | --------------------------------------------- |
| refused      | TorchScript tracing or scripting                  | a RuntimeError naming TorchScript             |
| sharded      | DTensor arguments (DTensor logits on a 1-D mesh;  | each rank's shard on the routes below, two    |
|              | other layouts raise, naming the placement)        | scalars all-reduced (`op/sharded.py`)         |
| plain_ops    | a torch.func transform inside torch.compile       | the reference's plain ops, which autograd,    |
|              |                                                   | DTensor and torch.func differentiate          |
| compiled_cpu | torch.compile of CPU tensors, backend `auto`      | `TracedCE`: plain ops Inductor fuses          |
| compiled     | torch.compile                                     | the registered op; AOTAutograd differentiates |
|              |                                                   | it through its registered derivatives         |
| planned      | eager code that nothing observes (`unobserved`)   | a call plan: `PlannedCE` and the              |
|              |                                                   | implementation itself, no dispatcher          |
| observed     | eager code something observes: a dispatch or      | `SigmoidCE` (torch.func's Function) and the   |
|              | function mode, a transform, the profiler, a       | registered ops, which the observer sees       |
|              | tensor subclass, another current CUDA device, a   |                                               |
|              | CUDA graph capture                                |                                               |

A plain eager training loop calls its loss with the same kinds of arguments
every step. The planned route's first call of a signature goes the whole
way: the front end's checks, the choice of the gradients the forward
writes, the launch plan of the kernel (or the implementation) it runs. What
that decided is kept as a `CallPlan`, keyed on everything it read: each
tensor's class, shape, strides, dtype, device, requires_grad and address
alignment, the front end's other arguments, the backend, grad mode and
autocast. A later call with that key skips the checks and the table: it
asks `unobserved` and applies the plan. A call whose checks convert an
argument (an integer weight, a number) gets a plan of its own, not kept.
"""

import contextlib
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.nn import Parameter

from .. import impl
from ..core import backend as _backend
from ..core import layout
from ..core import reduction as R
from ..core.dtypes import compute_dtype, number_as_tensor
from ..core.plans import PLANS, remember
from ..impl import reference
from . import registry  # noqa: F401  (registers torch.ops.fused_sigxent)
from . import sharded
from ..impl import ring as _ring
from .derivatives import REGISTERED, RingSigLIP, SigmoidCE, TracedCE, apply_planned, grads_in_forward

try:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.experimental import implicit_replication
except ImportError:  # a torch built without distributed support
    DTensor = None


class Route(NamedTuple):
    name: str
    taken: Callable  # (op arguments) -> bool
    run: Callable  # (op arguments, plan key or None, the caller's tensors) -> loss


def loss(prepare, logits, labels, weight, pos_weight, *options) -> Tensor:
    """The loss of the op arguments `prepare(logits, labels, weight,
    pos_weight, *options)` (a front end's checks, raising before any
    computation and depending on nothing but the key's contents; the op's
    arguments, the tensors first), by the first route of `ROUTES` that is
    taken. options: the front end's other arguments."""
    key = None
    # Dynamo folds is_compiling and reads no further: nothing below is traced.
    if not torch.compiler.is_compiling():
        key = _key(prepare, logits, labels, weight, pos_weight, options)
        if key is not None:
            try:
                plan = PLANS.get(key)
            except TypeError:  # an unhashable option: the front end's checks say what it should be
                plan = key = None
            if plan is not None and unobserved(plan.cuda_index):
                return apply_planned(logits, labels, weight, pos_weight, plan)
    return route(prepare(logits, labels, weight, pos_weight, *options), key, (logits, labels, weight, pos_weight))


def sigmoid_ce(logits: Tensor, labels: Tensor, weight: Tensor | None, pos_weight: Tensor | None,
               label_smoothing: float, reduction: int, out_dtype: torch.dtype, gamma: float | None = None,
               alpha: float | None = None) -> Tensor:
    """The loss of arguments a front end checked on this very call (no plan
    is kept for them): sigmoid cross entropy, or with `gamma` the focal loss
    (alpha None: no alpha_t)."""
    return route((logits, labels, weight, pos_weight, label_smoothing, reduction, out_dtype, gamma, alpha))


def route(args: tuple, key: tuple | None = None, given: tuple = ()) -> Tensor:
    """The loss of checked op arguments `args`, by the first route taken.
    key: the call's plan key, where a plan made for it may be kept (it is,
    where `args` holds the caller's own tensors, `given`)."""
    for r in ROUTES:
        if r.taken(args):
            return r.run(args, key, given)
    raise AssertionError("the observed route is always taken")


def unobserved(cuda_index: int | None = None, tensors: tuple = ()) -> bool:
    """Whether nothing can see or change a call now: no compile or trace, no
    dispatch or function mode, functorch transform or profiler; each of
    `tensors` (None passes) a plain Tensor or Parameter, no functorch
    wrapper; on CUDA device `cuda_index` (None: not CUDA), that device
    current (Triton launches on the current one) and no graph capture (which
    must allocate nothing a plan would keep). Such a call may skip the
    dispatcher: its layers would only add host time. Asked on every planned
    call, so kept to a few C-level checks."""
    if (torch.compiler.is_compiling()  # first: Dynamo folds it and reads no further
            or _dispatch_modes() or _function_modes() or _transforms() or _profiling() or _tracing()):
        return False
    if cuda_index is not None and (cuda_index != torch.cuda.current_device()
                                   or torch.cuda.is_current_stream_capturing()):
        return False
    for t in tensors:
        cls = t.__class__
        if cls is Tensor or cls is Parameter:
            if _wrapped(t):  # a dead functorch wrapper, left by a finished transform
                return False
        elif t is not None:
            return False
    return True


_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_transforms = torch._C._are_functorch_transforms_active
_profiling = torch.autograd._profiler_enabled
_tracing = torch._C._is_tracing
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_grad_enabled = torch.is_grad_enabled
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _key(prepare, logits, labels, weight, pos_weight, options) -> tuple | None:
    """The call's plan key, or None where it has none (its arguments are not
    what they should be: the front end's checks then say what is wrong).
    Each option's class too: True == 1.0 and Decimal("0.5") == 0.5, but only
    the float passes the checks."""
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


def _cuda_index(device: torch.device) -> int | None:
    return device.index if device.type == "cuda" else None


# The routes. Each `taken` test reads the op arguments: (logits, labels,
# weight, pos_weight, label_smoothing, reduction, out_dtype[, gamma, alpha]).


def _scripted(args) -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting()


def _refuse(args, key, given):
    refuse_torchscript()


def refuse_torchscript() -> None:
    """Raises under TorchScript tracing or scripting. TorchScript would bake a
    call's Python decisions (whether the forward writes the gradient, the
    backend) into a graph that later runs with other inputs: refused by name
    rather than traced wrong."""
    if _scripted(None):
        raise RuntimeError(
            "fused_sigxent does not support TorchScript (torch.jit.trace / torch.jit.script); "
            "use torch.export or torch.compile instead"
        )


def is_dtensor(*tensors) -> bool:
    """Whether any argument is a DTensor (torch.distributed.tensor)."""
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def _sharded(args) -> bool:
    return is_dtensor(*args[:4]) and not _compiled_transform()


def _run_sharded(args, key, given):
    return sharded.loss(args, route)


def _wants_plain_ops(args) -> bool:
    return _compiled_transform()


def _run_plain_ops(args, key, given):
    # The reference's plain ops, which autograd, DTensor (shard by shard,
    # plain 0-d tensors counting as replicated) and torch.func differentiate
    # and batch themselves.
    x, z, w, p, label_smoothing, reduction, out_dtype = args[:7]
    smoothing, focal = scalar_arguments(x, z, label_smoothing, *args[7:])
    with implicit_replication() if is_dtensor(x, z, w, p) else contextlib.nullcontext():
        loss, _, _, _ = reference.sigmoid_ce_fwd(x, z, w, p, smoothing, reduction, out_dtype, False, False, *focal)
    return loss


def _compiled_transform() -> bool:
    """A torch.func transform inside a torch.compile'd function. There the op
    is called directly (Dynamo cannot trace `SigmoidCE`), and a custom op
    without a forward-mode formula would give a zero tangent without a word."""
    return torch.compiler.is_compiling() and _functorch_depth() > 0


@torch._dynamo.assume_constant_result
def _functorch_depth() -> int:
    # A fact of the trace (a transform makes a graph of its own). Dynamo
    # calls this while tracing and keeps the number: torch 2.11's Dynamo
    # cannot trace the pybind builtin and broke the graph there.
    return torch._C._functorch.get_dynamic_layer_stack_depth()


def _compiled_on_cpu(args) -> bool:
    """A torch.compile'd graph on CPU tensors (backend `auto`): Inductor fuses
    the reference's plain ops, forward and backward, into vectorized C++
    loops; an opaque op would hide the math from it."""
    return torch.compiler.is_compiling() and args[0].device.type == "cpu" and _backend.backend() == "auto"


def _run_traced(args, key, given):
    x, z, w, p, label_smoothing, reduction, out_dtype = args[:7]
    smoothing, focal = scalar_arguments(x, z, label_smoothing, *args[7:])
    gamma, alpha = (*focal, None, None)[:2]
    return TracedCE.apply(x, z, w, p, smoothing, reduction, out_dtype, gamma, alpha)


def _compiling(args) -> bool:
    return torch.compiler.is_compiling()


def _run_compiled(args, key, given):
    # Dynamo cannot trace an autograd.Function that defines jvp, so a
    # compiled graph calls the op, which AOTAutograd differentiates through
    # its registered derivatives (the same functions as SigmoidCE's).
    x, z, w, p, label_smoothing, reduction, out_dtype = args[:7]
    smoothing, focal = scalar_arguments(x, z, label_smoothing, *args[7:])
    loss, _, _, _ = torch.ops.fused_sigxent.sigmoid_ce_fwd(
        x, z, w, p, smoothing, reduction, out_dtype, False, False, *focal)
    return loss


def _unobserved_call(args) -> bool:
    return unobserved(_cuda_index(args[0].device), args[:4])


def _run_planned(args, key, given):
    plan = CallPlan(*args)
    if key is not None and len(given) == 4 and all(a is b for a, b in zip(args[:4], given)):
        remember(key, plan)  # the caller's own tensors: later calls of the key replay it
    return apply_planned(*args[:4], plan)


def _always(args) -> bool:
    return True


def _run_observed(args, key, given):
    x, z, w, p, label_smoothing, reduction, out_dtype = args[:7]
    smoothing, focal = scalar_arguments(x, z, label_smoothing, *args[7:])
    grad_logits_in_fwd, grad_labels_in_fwd = grads_in_forward(x, z, w, reduction)
    loss, _, _, _ = SigmoidCE.apply(x, z, w, p, smoothing, reduction, out_dtype,
                                    grad_logits_in_fwd, grad_labels_in_fwd, *focal)
    return loss


ROUTES = (
    Route("refused", _scripted, _refuse),
    Route("sharded", _sharded, _run_sharded),
    Route("plain_ops", _wants_plain_ops, _run_plain_ops),
    Route("compiled_cpu", _compiled_on_cpu, _run_traced),
    Route("compiled", _compiling, _run_compiled),
    Route("planned", _unobserved_call, _run_planned),
    Route("observed", _always, _run_observed),
)


def scalar_arguments(logits: Tensor, labels: Tensor, label_smoothing: float, gamma: float | None = None,
                     alpha: float | None = None) -> tuple[Tensor, tuple]:
    """The op's label_smoothing (a 0-d tensor) and its focal arguments:
    (gamma, alpha, hard_labels), or () for the cross entropy. The op takes
    them as data, so a schedule of values neither specializes kernels nor
    recompiles."""
    ct = compute_dtype(logits.dtype)
    smoothing = number_as_tensor(label_smoothing, logits, ct)
    if gamma is None:
        return smoothing, ()

    def as_tensor(value):  # a number, or a 0-d tensor (data) the front end checked
        return value.to(ct) if isinstance(value, Tensor) else number_as_tensor(value, logits, ct)

    # Unsmoothed bool/uint8/class-index labels are 0 or 1: the kernels'
    # focal factor then needs no log (a host fact, so a constexpr).
    hard = (labels.dtype in (torch.bool, torch.uint8, torch.int64)
            and not isinstance(label_smoothing, torch.SymFloat) and label_smoothing == 0)
    return smoothing, (as_tensor(gamma), None if alpha is None else as_tensor(alpha), hard)


class CallPlan:
    """One signature's call on the planned route, as `PlannedCE` applies it:
    its `forward(logits, labels, weight, pos_weight)` returns the op's
    (loss, denominator, grad_logits, grad_labels); `scale` and `bwd` are the
    backward's launches."""

    __slots__ = ("forward", "smoothing", "reduction", "out_dtype", "focal", "grads_in_forward", "cuda_index",
                 "impl", "backend")

    def __init__(self, x, z, w, p, label_smoothing, reduction, out_dtype, gamma=None, alpha=None):
        self.smoothing, self.focal = scalar_arguments(x, z, label_smoothing, gamma, alpha)
        self.reduction, self.out_dtype = reduction, out_dtype
        grads = grads_in_forward(x, z, w, reduction)
        self.grads_in_forward = grads[0] or grads[1]
        self.cuda_index = _cuda_index(x.device)
        self.impl = impl.implementation(x.device)
        self.backend = _backend.backend()
        self.forward = _forward(self.impl, x, z, w, p, self.smoothing, reduction, out_dtype, grads, self.focal)

    def _direct(self, grad: Tensor) -> bool:
        """Whether the backward may run the implementation itself: nothing
        observes it (a mode or the profiler may have been turned on since
        the forward), and the backend is the forward's."""
        return unobserved(self.cuda_index, (grad,)) and _backend.backend() == self.backend

    def scale(self, grad: Tensor, grad_logits: Tensor, grad_labels: Tensor) -> None:
        """`REGISTERED.scale` of gradients this plan's forward wrote."""
        if self._direct(grad):
            self.impl.sigmoid_ce_scale_(grad, grad_logits, grad_labels)
        else:
            REGISTERED.scale(grad, grad_logits, grad_labels)

    def bwd(self, grad: Tensor, *args) -> tuple[Tensor, Tensor]:
        """`REGISTERED.bwd`: the gradients recomputed."""
        if self._direct(grad):
            return self.impl.sigmoid_ce_bwd(grad, *args)
        return REGISTERED.bwd(grad, *args)


def _forward(implementation, x, z, w, p, smoothing, reduction, out_dtype, grads, focal):
    """The forward of calls of x, z, w, p's signature: the kernel's launch
    plan, or the implementation's forward."""
    if not _backend.use_kernels(x.device):
        fwd = implementation.sigmoid_ce_fwd
        return lambda x, z, w, p: fwd(x, z, w, p, smoothing, reduction, out_dtype, *grads, *focal)
    from ..kernels import sigmoid_ce_fwd as kernel

    contiguous = layout.contiguous
    cx, cz = contiguous(x), contiguous(z)
    gamma, alpha, hard_labels = (*focal, None, None, False)[:3]
    launch = kernel.plan(cx, cz, z.dtype, w, p, smoothing, reduction, out_dtype, *grads, gamma, alpha, hard_labels)
    # A denominator that depends on the shape alone is the same every call:
    # the plan's own, rewritten by every launch (an allocation saved).
    denom = None
    if R.denominator_is_constant(reduction):
        with torch.inference_mode(False):
            denom = torch.empty((), dtype=compute_dtype(x.dtype), device=x.device)
    if cx is x and cz is z:
        return lambda x, z, w, p: launch(x, z, w, p, smoothing, gamma, alpha, None, denom, False)
    return lambda x, z, w, p: launch(contiguous(x), contiguous(z), w, p, smoothing, gamma, alpha, None, denom, False)


# The chunked linear op (`fs.linear_sigmoid_cross_entropy`, `fs.siglip_loss`)
# has two routes, eager and compiled alike: SigLIP over a process group of
# more than one rank takes the ring (`RingSigLIP`, `impl/ring.py`); every
# other call the registered op, whose forward computes every gradient (no
# kernel choice to plan, no backward to recompute).


def refuse_unsupported_linear(name: str, *tensors: Tensor | None, class_parallel: bool = False) -> None:
    """Refuses, by name, what the chunked op cannot serve: TorchScript, a
    torch.func transform (its gradients are data from the forward, not a
    functorch formula) and DTensor arguments, except (`class_parallel`) a
    DTensor weight (the class-parallel head, `op/sharded.py`)."""
    refuse_torchscript()
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            f"{name} does not support torch.func transforms (grad, vmap, jacrev, ...): use the unfused "
            "composition fs.binary_cross_entropy_with_logits(F.linear(...), ...)")
    if is_dtensor(*tensors) and not (class_parallel and is_dtensor(tensors[1])):
        raise NotImplementedError(
            f"{name} does not support these DTensor arguments: "
            + ("place the weight Shard(0) for the class-parallel head, or pass local tensors (to_local())"
               if class_parallel else "pass local tensors (to_local())"))


def linear_loss(input, weight, bias, scale, target, positives, pos_weight, label_smoothing, reduction,
                chunk_size) -> Tensor:
    """The loss of the chunked op on checked arguments, asking it for the
    gradients of the tensors that require them; a DTensor weight takes the
    class-parallel head."""
    if DTensor is not None and isinstance(weight, DTensor):
        return sharded.class_parallel(input, weight, bias, target, positives, pos_weight, label_smoothing, reduction,
                                      chunk_size)
    grad_mode = torch.is_grad_enabled()
    needs = [grad_mode and t is not None and t.requires_grad for t in (input, weight, bias, scale, pos_weight)]
    loss, *_ = torch.ops.fused_sigxent.linear_sigmoid_ce(
        input, weight, bias, scale, target, positives, pos_weight, label_smoothing, reduction, chunk_size, *needs)
    return loss


def siglip_loss(image, text, scale, bias, smoothing, chunk_size, group) -> Tensor:
    """SigLIP's loss of checked arguments: over `group`'s global batch by the
    ring where the group has more than one rank, else the chunked op."""
    if group is not None:
        ring = _ring.Ring(group)
        if ring.world > 1:
            text_needs_grad = torch.is_grad_enabled() and text.requires_grad
            _ring.check_equal_blocks(ring, image, text_needs_grad)
            return RingSigLIP.apply(image, text, scale, bias, ring, chunk_size)
    return linear_loss(image, text, bias, scale, None, None, None, smoothing, R.MEAN_BY_ROWS, chunk_size)
