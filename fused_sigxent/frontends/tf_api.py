"""TensorFlow-style front ends: TF's argument names, shapes rules and reductions."""

from torch import Tensor

from ..core import reduction as R
from ..core.dtypes import number_as_tensor, out_dtype
from ..core.reduction import Reduction
from ..op import routes
from . import checks


def sigmoid_cross_entropy_with_logits(*, labels: Tensor, logits: Tensor) -> Tensor:
    """`tf.nn.sigmoid_cross_entropy_with_logits`: elementwise loss, shaped and typed as `logits`."""
    return routes.loss(_elementwise, logits, labels, None, None, "labels")


def deprecated_flipped_sigmoid_cross_entropy_with_logits(logits: Tensor, targets: Tensor) -> Tensor:
    """`tf.contrib.nn.deprecated_flipped_sigmoid_cross_entropy_with_logits`: (logits, targets) order."""
    return routes.loss(_elementwise, logits, targets, None, None, "targets")


def weighted_cross_entropy_with_logits(*, labels: Tensor, logits: Tensor, pos_weight) -> Tensor:
    """`tf.nn.weighted_cross_entropy_with_logits`: positives weighted by `pos_weight`
    (a number, or a tensor that broadcasts to `logits`), elementwise."""
    return routes.loss(_weighted, logits, labels, None, pos_weight)


def _elementwise(logits, labels, _weight, _pos_weight, labels_name: str) -> tuple:
    """The checked arguments of `routes.sigmoid_ce` for TF's elementwise loss."""
    x = checks.logits("logits", logits)
    z = checks.labels(labels_name, labels, x, "logits")
    return x, z, None, None, 0.0, R.NONE, out_dtype(x)


def _weighted(logits, labels, _weight, pos_weight) -> tuple:
    """The checked arguments of `routes.sigmoid_ce` for TF's weighted elementwise loss."""
    x, z, *_ = _elementwise(logits, labels, None, None, "labels")
    if checks.is_number(pos_weight):
        pos_weight = number_as_tensor(pos_weight, x)
    p = checks.coefficient("pos_weight", pos_weight, x, "logits")
    return x, z, None, p, 0.0, R.NONE, out_dtype(x)


def _reduction_code(reduction) -> int:
    try:
        return R.TF_CODES[Reduction(reduction)]
    except (ValueError, KeyError):
        names = ", ".join(f"Reduction.{r.name}" for r in Reduction)
        raise ValueError(f"reduction must be one of {names} (or their string values); got {reduction!r}") from None


def _tf_weights(weights, x: Tensor) -> Tensor | None:
    """TF's weights rule: a number or 0-d tensor; a tensor of the
    logits' rank whose every dimension is 1 or the logits'; or, as TF's doc
    promises, a [batch_size] vector that weights each sample (viewed, not copied,
    as [batch_size, 1, ...])."""
    if weights is None:
        raise ValueError("weights must be a number or a tensor, got None")
    if checks.is_number(weights):
        # 1.0, TF's default, weights nothing: skip reading it at all.
        return None if float(weights) == 1.0 else number_as_tensor(weights, x)
    w = checks.tensor("weights", weights)
    per_sample = w.dim() == 1 and x.dim() >= 1 and w.shape[0] == x.shape[0]
    if per_sample:
        w = w.reshape(w.shape + (1,) * (x.dim() - 1))
    elif w.dim() not in (0, x.dim()) or any(wd not in (1, xd) for wd, xd in zip(w.shape, x.shape)):
        raise ValueError(
            f"weights of shape {tuple(w.shape)} is invalid for logits of shape {tuple(x.shape)}: "
            "it must be 0-d, of the logits' rank with every dimension 1 or equal to the logits', "
            "or [batch_size]"
        )
    return checks.coefficient("weights", w, x, "logits")


def sigmoid_cross_entropy(
    multi_class_labels,
    logits,
    weights=1.0,
    label_smoothing=0.0,
    reduction=Reduction.SUM_BY_NONZERO_WEIGHTS,
) -> Tensor:
    """`tf.losses.sigmoid_cross_entropy`: weighted, smoothed and reduced as TF does.

    Integer labels and weights are cast, as TF casts them. Returns a 0-d loss,
    or the logits' shape for `Reduction.NONE`.
    """
    # A tensor of weights is the call's weight tensor; a number is an option.
    tensor = weights if isinstance(weights, Tensor) else None
    number = None if tensor is not None else weights
    return routes.loss(_losses, logits, multi_class_labels, tensor, None, number, label_smoothing, reduction)


def _losses(logits, multi_class_labels, weights, _pos_weight, number, label_smoothing, reduction) -> tuple:
    """The checked arguments of `routes.sigmoid_ce` for `sigmoid_cross_entropy`."""
    x = checks.logits("logits", logits)
    z = checks.labels("multi_class_labels", multi_class_labels, x, "logits", cast_integers=True)
    w = _tf_weights(number if weights is None else weights, x)
    s = checks.label_smoothing(label_smoothing)
    code = _reduction_code(reduction)
    return x, z, w, None, s, code, out_dtype(x)
