"""Derivatives of the ops: of `fused_sigxent::sigmoid_ce_fwd` reverse mode
(first order fused; higher order through the reference formulas), forward
mode and vmap; of `fused_sigxent::linear_sigmoid_ce` the scaling of the
gradients its forward wrote.

One set of derivative functions (`setup_context`, `backward`, `jvp`) serves
every registration of the loss: the op's own (`register_autograd`, which
compiled graphs differentiate); `SigmoidCE`, the autograd.Function of the
observed route, which adds what torch.library cannot register for a custom
op (torch.func transforms, forward-mode AD, a batching rule); `PlannedCE`,
the same Function at the least host cost, which a call plan applies; and
`TracedCE`, the compiled-CPU route's Function of plain ops. The route table
that picks among them is in `op/routes.py`.

The backward's launches go through `ctx.ops`: the registered ops
(`REGISTERED`) for the op's and SigmoidCE's, so a mode, transform, profile
or compiled graph sees them; a call plan for PlannedCE's, which runs the
implementation directly while nothing observes the backward either.
"""

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from ..core import reduction as R
from ..core.dtypes import compute_dtype
from ..impl import class_parallel as _class_parallel
from ..impl import reference as _reference
from ..impl import ring as _ring


class RegisteredOps:
    """The backward's launches through the registered ops (the dispatcher)."""

    @staticmethod
    def scale(grad: Tensor, grad_logits: Tensor, grad_labels: Tensor) -> None:
        """Multiplies the gradients a forward wrote by the incoming gradient, in
        place: one launch, which returns at once when `grad` is 1."""
        torch.ops.fused_sigxent.sigmoid_ce_scale_(grad, grad_logits, grad_labels)

    @staticmethod
    def bwd(*args) -> tuple[Tensor, Tensor]:
        """`sigmoid_ce_bwd(*args)`: the gradients recomputed in one launch."""
        return torch.ops.fused_sigxent.sigmoid_ce_bwd(*args)


REGISTERED = RegisteredOps()


def setup_context(ctx, inputs, output):
    (logits, labels, weight, pos_weight, smoothing, reduction, out_dtype, grad_logits_in_fwd, grad_labels_in_fwd,
     *focal) = inputs
    _, denom, grad_logits, grad_labels = output
    ctx.mark_non_differentiable(denom, grad_logits, grad_labels)
    # Autograd would otherwise fill a zero "incoming gradient" for each of
    # those outputs: a full-size tensor and a pass over it for grad_logits.
    ctx.set_materialize_grads(False)
    _save(ctx, logits, labels, weight, pos_weight, smoothing, denom, reduction, out_dtype, focal,
          (grad_logits, grad_labels) if grad_logits_in_fwd or grad_labels_in_fwd else None, REGISTERED)


def _save(ctx, logits, labels, weight, pos_weight, smoothing, denom, reduction, out_dtype, focal, grads_from_fwd,
          ops):
    """What `backward` and `jvp` read. focal: (gamma, alpha, hard_labels) of
    the focal loss, or () (the defaults: the cross entropy). grads_from_fwd:
    (grad_logits, grad_labels) the forward wrote, or None. ops: what the
    backward launches through (`REGISTERED`, or a call plan)."""
    gamma, alpha, hard_labels = (*focal, *(None, None, False)[len(focal):])
    ctx.save_for_backward(logits, labels, weight, pos_weight, smoothing, denom, gamma, alpha)
    if _forward_ad._current_level >= 0:
        # jvp runs only where an input has a tangent, which needs a dual
        # level (forward_ad.dual_level, torch.func.jvp); outside one, saving
        # for it would only cost host time on every call.
        ctx.save_for_forward(logits, labels, weight, pos_weight, smoothing, gamma, alpha)
    ctx.reduction, ctx.out_dtype, ctx.hard_labels = reduction, out_dtype, hard_labels
    # The gradients the forward wrote serve one backward, which scales them in
    # place and hands them to autograd. They are kept out of
    # save_for_backward on purpose: once handed out, a hook or an optimizer may
    # change them in place, and no later backward reads them (it recomputes).
    ctx.grads_from_fwd = grads_from_fwd
    ctx.ops = ops


def backward(ctx, grad, _grad_denom, _grad_grad_logits, _grad_grad_labels):
    needs = ctx.needs_input_grad
    # One None for each input past the four differentiable ones (the op's
    # 12, or SigmoidCE.apply's 9 to 12).
    rest = (None,) * (len(needs) - 4)
    grads_from_fwd, ctx.grads_from_fwd = ctx.grads_from_fwd, None
    if grad is None:  # no gradient reached the loss (grads are not materialized)
        return (None,) * 4 + rest
    differentiable = torch.is_grad_enabled() or _is_batched(grad)
    if grads_from_fwd is not None and not (differentiable or needs[2] or needs[3]):
        # The forward wrote the gradients: scaled in place (one launch that
        # returns at once when `grad` is 1), no saved tensor read.
        grad_logits, grad_labels = grads_from_fwd
        ctx.ops.scale(grad, grad_logits, grad_labels)
        return (grad_logits if needs[0] else None, grad_labels if needs[1] else None, None, None, *rest)
    logits, labels, weight, pos_weight, smoothing, denom, gamma, alpha = ctx.saved_tensors
    if differentiable:
        # create_graph=True, or a torch.func transform: the gradient must
        # itself be differentiable, so it is built from plain PyTorch ops
        # (the reference formulas), with the denominator recomputed from the
        # weight so that its dependence on the weight is seen too. A batch of
        # incoming gradients (jacobian(vectorize=True), is_grads_batched)
        # needs ops with batching rules: the same plain ops.
        grads = differentiable_grads(grad, logits, labels, weight, pos_weight, smoothing, ctx.reduction,
                                     needs[:4], gamma, alpha)
    else:
        grads = _fused_grads(ctx.ops, grad, logits, labels, weight, pos_weight, smoothing, denom, ctx.reduction,
                             needs[:4], grads_from_fwd, gamma, alpha, ctx.hard_labels)
    return (*grads, *rest)


def _is_batched(t: Tensor) -> bool:
    """A batch of incoming gradients: legacy `Batched` (is_grads_batched,
    jacobian(vectorize=True)) or functorch's vmap."""
    return torch._C._functorch.is_legacy_batchedtensor(t) or torch._C._functorch.is_batchedtensor(t)


def _fused_grads(ops, grad, logits, labels, weight, pos_weight, smoothing, denom, reduction, needs,
                 grads_from_fwd, gamma=None, alpha=None, hard_labels=False):
    """First-order gradients: the forward's, scaled in place, or one
    recompute launch (through `ops`); weight and pos_weight gradients on the
    slower reference path."""
    need_logits, need_labels, need_weight, need_pos_weight = needs
    grad_logits = grad_labels = None
    if grads_from_fwd is not None and (need_logits or need_labels):
        grad_logits, grad_labels = grads_from_fwd
        ops.scale(grad, grad_logits, grad_labels)
    elif need_logits or need_labels:
        focal = () if gamma is None else (gamma, alpha, hard_labels)
        grad_logits, grad_labels = ops.bwd(grad, logits, labels, weight, pos_weight, denom, smoothing, reduction,
                                           need_logits, need_labels, *focal)
    grad_weight = grad_pos_weight = None
    if need_weight or need_pos_weight:
        grad_weight, grad_pos_weight = _reference.sigmoid_ce_param_grads(
            grad, logits, labels, weight, pos_weight, denom, smoothing, reduction, need_weight, need_pos_weight,
            gamma, alpha,
        )
    return (grad_logits if need_logits else None, grad_labels if need_labels else None, grad_weight, grad_pos_weight)


def differentiable_grads(grad, logits, labels, weight, pos_weight, smoothing, reduction, needs,
                         gamma=None, alpha=None):
    """The four gradients as plain differentiable ops (the reference's
    formulas), the denominator recomputed from the weight."""
    need_logits, need_labels, need_weight, need_pos_weight = needs
    denom = _reference.denominator(reduction, weight, logits, compute_dtype(logits.dtype))
    grad_logits, grad_labels = _reference.sigmoid_ce_bwd(
        grad, logits, labels, weight, pos_weight, denom, smoothing, reduction, need_logits, need_labels,
        gamma, alpha,
    )
    grad_weight, grad_pos_weight = _reference.sigmoid_ce_param_grads(
        grad, logits, labels, weight, pos_weight, denom, smoothing, reduction, need_weight, need_pos_weight,
        gamma, alpha,
    )
    return (grad_logits if need_logits else None, grad_labels if need_labels else None, grad_weight, grad_pos_weight)


def jvp(ctx, t_logits, t_labels, t_weight, t_pos_weight, *_):
    logits, labels, weight, pos_weight, smoothing, gamma, alpha = ctx.saved_tensors
    t_loss = _reference.sigmoid_ce_jvp(
        logits, labels, weight, pos_weight, smoothing, ctx.reduction, ctx.out_dtype,
        (t_logits, t_labels, t_weight, t_pos_weight), gamma, alpha,
    )
    return t_loss, None, None, None


class SigmoidCE(torch.autograd.Function):
    """The op with the derivatives above, in the form torch.func accepts: the
    observed route's Function. Its forward calls the registered op, so a
    mode or a profile sees `fused_sigxent::sigmoid_ce_fwd`."""

    @staticmethod
    def forward(logits, labels, weight, pos_weight, smoothing, reduction, out_dtype,
                grad_logits_in_fwd, grad_labels_in_fwd, gamma=None, alpha=None, hard_labels=False):
        focal = () if gamma is None else (gamma, alpha, hard_labels)
        return torch.ops.fused_sigxent.sigmoid_ce_fwd(
            logits, labels, weight, pos_weight, smoothing, reduction, out_dtype,
            grad_logits_in_fwd, grad_labels_in_fwd, *focal,
        )

    setup_context = staticmethod(setup_context)
    backward = staticmethod(backward)
    jvp = staticmethod(jvp)

    @staticmethod
    def vmap(info, in_dims, logits, labels, weight, pos_weight, smoothing, reduction, out_dtype,
             grad_logits_in_fwd, grad_labels_in_fwd, gamma=None, alpha=None, hard_labels=False):
        """One op call for the whole batch: the elementwise loss of every
        sample at once, then one reduction per sample."""
        x_dim, z_dim, w_dim, p_dim, s_dim = in_dims[:5]
        if s_dim is not None:
            raise ValueError("vmap over label_smoothing is not supported: it is one number per call")
        if any(d is not None for d in in_dims[9:11]):
            raise ValueError("vmap over the focal loss's gamma or alpha is not supported: one number per call")
        size = info.batch_size
        x = logits.movedim(x_dim, 0) if x_dim is not None else logits.expand(size, *logits.shape)
        z = labels.movedim(z_dim, 0) if z_dim is not None else labels.expand(size, *labels.shape)

        def coefficient(t, dim):
            # Batched: (B, *shape) aligned under (B, *sample shape); unbatched:
            # it already broadcasts to the batched logits by NumPy rules.
            if t is None or dim is None:
                return t
            t = t.movedim(dim, 0)
            return t.reshape(size, *(1,) * (x.dim() - t.dim()), *t.shape[1:])

        w, p = coefficient(weight, w_dim), coefficient(pos_weight, p_dim)
        ct = compute_dtype(x.dtype)
        loss, _, _, _ = SigmoidCE.apply(x, z, w, p, smoothing, R.NONE, out_dtype if reduction == R.NONE else ct,
                                        False, False, gamma, alpha, hard_labels)
        empty_logits, empty_labels = logits.new_empty(0), labels.new_empty(0)
        if reduction == R.NONE:
            denom = torch.ones(size, dtype=ct, device=x.device)
            return (loss, denom, empty_logits, empty_labels), (0, 0, None, None)
        if w is not None and w_dim is None:
            w = w.expand(size, *w.shape)  # the same weight for every sample, as a view
        denom = _reference.denominator(reduction, w, x, ct, batch_dims=1)
        total = _reference.divide(loss.reshape(size, -1).sum(-1), denom, reduction)
        return (total.to(out_dtype), denom, empty_logits, empty_labels), (0, 0, None, None)


class PlannedCE(torch.autograd.Function):
    """SigmoidCE as a call plan (`op/routes.CallPlan`) applies it in plain
    eager code, at the least host cost: the forward runs the plan's forward
    (the implementation itself: the dispatcher's layers would only add
    time); it returns the loss alone and takes the plan as its one
    non-differentiable argument (autograd wraps each output and checks each
    input, a cost per argument); and it saves in the forward itself (the
    older form, which torch.func does not accept, and none of its
    transforms comes here). Same derivatives, same backward, whose launches
    go through the plan (which asks again whether anything observes them: a
    profiler or a mode may be on by the time it runs)."""

    @staticmethod
    def forward(ctx, logits, labels, weight, pos_weight, plan):
        loss, denom, grad_logits, grad_labels = plan.forward(logits, labels, weight, pos_weight)
        _save(ctx, logits, labels, weight, pos_weight, plan.smoothing, denom, plan.reduction, plan.out_dtype,
              plan.focal, (grad_logits, grad_labels) if plan.grads_in_forward else None, plan)
        return loss

    @staticmethod
    def backward(ctx, grad):
        return backward(ctx, grad, None, None, None)

    @staticmethod
    def jvp(ctx, t_logits, t_labels, t_weight, t_pos_weight, _):
        return jvp(ctx, t_logits, t_labels, t_weight, t_pos_weight)[0]


# Function.apply's Python prelude binds the arguments to forward's signature
# (for setup_context) and unwraps dead functorch wrappers; in plain eager
# code it has nothing to do, and its C++ core is called directly.
apply_planned = super(torch.autograd.Function, PlannedCE).apply


def grads_in_forward(logits: Tensor, labels: Tensor, weight: Tensor | None, reduction: int) -> tuple[bool, bool]:
    """Whether the forward writes the final logits/labels gradients.

    Bytes per element, with e_x, e_z the logits and labels sizes, for a
    training step (forward + backward) of a reduced loss:
      - gradient in the forward: read x, z, write dx once (e_x + e_z + e_x);
        the backward reads one scalar and returns when it is 1, else reads
        and writes dx again (+ 2 e_x).
      - recompute in the backward: the forward reads x, z; the backward reads
        them again and writes dx (2 e_x + 2 e_z + e_x).
    So the forward writes the gradient whenever one will be needed and its
    scale is known before the reduction ends (`denominator_is_static`). For
    NONE the incoming gradient is a full tensor, so there is nothing to save.
    Under a torch.func transform the backward is built from differentiable
    ops instead, so nothing is written ahead.

    Under torch.compile the in-place scale cannot return at once: AOTAutograd
    makes it functional, and Inductor copies the saved gradient before
    scaling it (+ 2 e_x even for an incoming 1: 9 bytes an element for bf16
    logits and byte labels where recompute reads and writes 8). A compiled
    backward recomputes.
    """
    if reduction == R.NONE or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False, False
    if torch._C._functorch.is_functorch_wrapped_tensor(logits):
        return False, False
    if not R.denominator_is_static(reduction, None if weight is None else weight.numel()):
        return False, False
    return logits.requires_grad, labels.requires_grad


class TracedCE(torch.autograd.Function):
    """The compiled-CPU route's Function: Dynamo traces both methods into the
    graph, plain ops, nothing opaque, and Inductor fuses them, forward and
    backward, into its own vectorized loops. The forward is the reference's
    loss. Autograd's derivative of it (through the masks, relus and
    log1p(exp)) would be some forty vector operations per element; the
    backward is `differentiable_grads` instead (for the logits, one exp and
    one division per element). No jvp or vmap: a torch.func transform takes
    the plain-ops route, and a double backward is refused by the compiled
    graph itself."""

    @staticmethod
    def forward(ctx, logits, labels, weight, pos_weight, smoothing, reduction, out_dtype, gamma, alpha):
        loss, _, _, _ = _reference.sigmoid_ce_fwd(
            logits, labels, weight, pos_weight, smoothing, reduction, out_dtype, False, False, gamma, alpha)
        ctx.save_for_backward(logits, labels, weight, pos_weight, smoothing, gamma, alpha)
        ctx.reduction = reduction
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, labels, weight, pos_weight, smoothing, gamma, alpha = ctx.saved_tensors
        grads = differentiable_grads(grad, logits, labels, weight, pos_weight, smoothing, ctx.reduction,
                                     ctx.needs_input_grad[:4], gamma, alpha)
        return (*grads, None, None, None, None, None)


def linear_setup_context(ctx, inputs, output):
    _, *grads = output
    ctx.mark_non_differentiable(*grads)
    # Autograd would otherwise make zero "incoming gradients" for those outputs.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*grads)
    ctx.needs = tuple(inputs[10:15])


def _no_double_backward() -> None:
    # create_graph=True: the chunked losses' gradients are computed as data
    # (in the forward, or recomputed as data in the backward); returned
    # here they would differentiate as constants, a silently zero second
    # derivative.
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fused_sigxent's fused linear losses (linear_sigmoid_cross_entropy, siglip_loss) do not support "
            "double backward (create_graph=True): their gradients are computed in the forward. Use the unfused "
            "composition, fs.binary_cross_entropy_with_logits(F.linear(input, weight, bias), target)")


def linear_backward(ctx, grad, *_):
    """The chunked forward wrote every gradient for an incoming gradient of 1: scale them."""
    if grad is None:
        return (None,) * 15
    _no_double_backward()
    grad_input, grad_weight, grad_bias, grad_scale, grad_pos_weight = (
        g * grad if need else None for g, need in zip(ctx.saved_tensors, ctx.needs))
    return (grad_input, grad_weight, grad_bias, grad_scale, None, None, grad_pos_weight) + (None,) * 8


class RingSigLIP(torch.autograd.Function):
    """SigLIP over a process group's global batch (`impl/ring.py`): the
    forward's ring scores every rank's text block and writes this rank's
    image, scale and bias gradients (and its own text block's); the backward
    scales them by the incoming gradient and runs the image ring for the text
    gradient from every rank's loss. Every rank of the group must run the
    backward (as every rank of a DDP step does)."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, ring, chunk_size):
        needs = tuple(ctx.needs_input_grad[:4])
        loss, grad_image, grad_scale, grad_bias, grad_text_own = _ring.forward(
            ring, image, text, scale, bias, chunk_size, (needs[0], needs[1], needs[2], needs[3]))
        ctx.save_for_backward(image, text, scale, bias, grad_image, grad_scale, grad_bias, grad_text_own)
        ctx.ring, ctx.chunk_size, ctx.needs = ring, chunk_size, needs
        return loss

    @staticmethod
    def backward(ctx, grad):
        _no_double_backward()
        image, text, scale, bias, grad_image, grad_scale, grad_bias, grad_text_own = ctx.saved_tensors
        need_image, need_text, need_scale, need_bias = ctx.needs
        grad_text = None
        if need_text:
            grad_text = _ring.backward_text(ctx.ring, image, text, scale, bias, grad, grad_text_own, ctx.chunk_size)
        return (grad_image * grad if need_image else None, grad_text,
                (grad_scale * grad).to(scale.dtype) if need_scale else None,
                (grad_bias * grad).to(bias.dtype) if need_bias else None, None, None)


class ClassParallelHead(torch.autograd.Function):
    """The class-parallel fused linear head (`impl/class_parallel.py`) on
    this rank's shards: the forward (rows gathered first where each rank
    holds its own) writes every gradient for an incoming gradient of 1; the
    backward scales them, reducing the input's over the ranks (all-reduced,
    or reduce-scattered back to each rank's rows). Every rank of the group
    must run the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, pos_weight, dense, positives, smoothing, mean, n_classes, chunk_size,
                rows_sharded, group):
        counts = None
        if rows_sharded:  # (the positives come gathered: ids are mapped to this rank's classes after)
            x, counts = _class_parallel.gather_rows(x, group)
        needs = tuple(ctx.needs_input_grad[:4])
        loss, grad_x, grad_w, grad_b, grad_p = _class_parallel.forward(
            x, weight, bias, pos_weight, dense, positives, smoothing, mean, n_classes, chunk_size, needs, group)
        ctx.save_for_backward(grad_x, grad_w, grad_b, grad_p)
        ctx.needs, ctx.counts, ctx.group = needs, counts, group
        return loss

    @staticmethod
    def backward(ctx, grad):
        _no_double_backward()
        grad_x, grad_w, grad_b, grad_p = ctx.saved_tensors
        need_x, need_w, need_b, need_p = ctx.needs
        if need_x:
            if ctx.counts is not None:
                grad_x = _class_parallel.scatter_rows(grad_x, ctx.counts, ctx.group)
            else:
                torch.distributed.all_reduce(grad_x, group=ctx.group)
        return (grad_x * grad if need_x else None, grad_w * grad if need_w else None,
                grad_b * grad if need_b else None, grad_p * grad if need_p else None) + (None,) * 8
