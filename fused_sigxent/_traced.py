"""The loss for a torch.compile'd graph on CPU tensors.

Inductor fuses plain ops, forward and backward, into its own vectorized
loops, where the opaque op would hide the math from it. The forward is the
reference's loss. Autograd's derivative of it (through the masks, relus and
log1p(exp)) would be some forty vector operations per element; the backward
here is the reference's gradient formulas instead (for the logits, one exp
and one division per element), as the op's own differentiable backward is.
"""

import torch

from . import _autograd, _reference


class TracedCE(torch.autograd.Function):
    """Dynamo traces both methods into the graph: plain ops, nothing opaque.
    No jvp or vmap: a torch.func transform takes the reference's plain ops
    (`_op.sigmoid_ce`), and a double backward is refused by the compiled
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
        grads = _autograd._differentiable_grads(grad, logits, labels, weight, pos_weight, smoothing, ctx.reduction,
                                                ctx.needs_input_grad[:4], gamma, alpha)
        return (*grads, None, None, None, None, None)


def loss(logits, labels, weight, pos_weight, label_smoothing, reduction, out_dtype,
         gamma=None, alpha=None, hard_labels=False):
    """The op's loss (hard_labels is a kernel's shortcut; the reference needs no promise)."""
    return TracedCE.apply(logits, labels, weight, pos_weight, label_smoothing, reduction, out_dtype, gamma, alpha)
