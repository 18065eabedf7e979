"""Reduction names of the front ends and the one table of integer codes the ops take."""

import enum


class Reduction(str, enum.Enum):
    """TensorFlow's ``tf.losses.Reduction``; the values are TF's own strings."""

    NONE = "none"
    SUM = "weighted_sum"
    MEAN = "weighted_mean"
    SUM_OVER_BATCH_SIZE = "weighted_sum_over_batch_size"
    SUM_BY_NONZERO_WEIGHTS = "weighted_sum_by_nonzero_weights"
    # TF spells the same reduction twice; an equal value makes this an alias.
    SUM_OVER_NONZERO_WEIGHTS = "weighted_sum_by_nonzero_weights"


# The ops' `reduction` argument: one table for every op. Every front end maps
# onto these; the numbers are part of the op schemas, so they never change
# meaning.
NONE = 0
SUM = 1
MEAN_BY_WEIGHTS = 2  # sum(w*l) / sum(w), 0 when sum(w) == 0 (TF MEAN)
MEAN_BY_NUMEL = 3  # sum(w*l) / numel, 0 when empty (TF SUM_OVER_BATCH_SIZE)
MEAN_BY_NONZERO = 4  # sum(w*l) / count(w != 0), 0 when the count is 0
TORCH_MEAN = 5  # sum(w*l) / numel, NaN when empty, as PyTorch's "mean"
MEAN_BY_ROWS = 6  # sum(l) / rows, NaN when empty: SigLIP's (the chunked linear op only)
CODES = (NONE, SUM, MEAN_BY_WEIGHTS, MEAN_BY_NUMEL, MEAN_BY_NONZERO, TORCH_MEAN)  # sigmoid_ce_fwd's

TF_CODES = {
    Reduction.NONE: NONE,
    Reduction.SUM: SUM,
    Reduction.MEAN: MEAN_BY_WEIGHTS,
    Reduction.SUM_OVER_BATCH_SIZE: MEAN_BY_NUMEL,
    Reduction.SUM_BY_NONZERO_WEIGHTS: MEAN_BY_NONZERO,
}
TORCH_CODES = {"none": NONE, "sum": SUM, "mean": TORCH_MEAN}


def torch_code(reduction) -> int:
    """The code of a PyTorch-style reduction name; ValueError for any other value."""
    if reduction not in TORCH_CODES:
        raise ValueError(f"{reduction!r} is not a valid value for reduction: use 'none', 'mean' or 'sum'")
    return TORCH_CODES[reduction]


def denominator_is_static(reduction: int, weight_numel: int | None) -> bool:
    """True when the denominator needs no pass over a weight tensor.

    Then a kernel knows the gradient's scale before the reduction ends, so the
    forward can write the final gradient (see `op/derivatives.grads_in_forward`).
    A single-element weight counts as static: every program reads it.
    """
    if reduction in (SUM, MEAN_BY_NUMEL, TORCH_MEAN):
        return True
    if reduction in (MEAN_BY_WEIGHTS, MEAN_BY_NONZERO):
        return weight_numel is None or weight_numel == 1
    return False


def denominator_is_constant(reduction: int) -> bool:
    """True when the denominator depends on the shape alone (never on a
    weight's values): the same for every call of one shape."""
    return reduction in (NONE, SUM, MEAN_BY_NUMEL, TORCH_MEAN)
