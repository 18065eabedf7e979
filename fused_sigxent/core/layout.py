"""The broadcast layout every implementation that reads coefficients through
strides shares (the Triton kernels and the CPU loop): contiguous logits and
labels, and broadcast coefficients collapsed to at most four strided
dimensions."""

import functools

import torch
from torch import Tensor

# Dimensions a coefficient's strides are kept over: (outer, batch, rows,
# classes) covers every broadcast of rank 4 or less, and the kernels unravel
# at most this many (`ndim`).
MAX_DIMS = 4


def contiguous(t: Tensor) -> Tensor:
    """The one copy the kernels make: non-contiguous logits, labels or incoming
    gradients are copied once; contiguous ones are used as they are. Bool
    labels are read as bytes."""
    t = t.contiguous()
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _broadcast_strides(layout: tuple | None, shape: torch.Size) -> list[int]:
    """A coefficient's c.expand(shape).stride() where it matters (dimensions
    of `shape` other than 1), from its (shape, strides)."""
    if layout is None:
        return [0] * len(shape)
    c_shape, c_stride = layout
    return [0] * (len(shape) - len(c_shape)) + [st if size != 1 else 0 for size, st in zip(c_shape, c_stride)]


def collapse(shape: torch.Size, coefficients: list[Tensor | None],
             classes_apart: bool = False) -> tuple[list[int], list[Tensor | None], list[list[int]]]:
    """Sizes (d0..d3, outermost first, padded with 1) of the logits' shape after
    merging every pair of adjacent dimensions that all coefficients traverse
    contiguously; the coefficients; and each one's strides over those
    dimensions (0 where it is broadcast).

    (B, C) logits with a (1, C) weight stay (B, C) with weight strides (0, 1);
    a (B, 1) per-sample weight over (B, 1) logits collapses to one dimension.
    More than four dimensions remain only for interleaved broadcasts of rank
    5 or more; those coefficients are made contiguous at full size (the one
    case where a broadcast coefficient is materialized).

    classes_apart (class-index labels, one per row): the last dimension is
    kept apart from the rows, whatever its size, so that the kernels step
    each chunk's (row, class) as for a per-class weight (a two-dimensional
    collapse then always has the classes last); where that leaves more than
    four dimensions, the plain collapse (whose rows are found by division).
    """
    layouts = tuple(None if c is None else (c.shape, c.stride()) for c in coefficients)
    if shape.numel() and classes_apart and (geometry := _collapsed(shape, layouts, True)) is not None:
        sizes, strides = geometry
        return list(sizes), coefficients, [list(st) for st in strides]
    if shape.numel() == 0 or all(c is None for c in coefficients):
        # Nothing to read through strides: one flat dimension.
        return [1] * (MAX_DIMS - 1) + [shape.numel()], coefficients, [[0] * MAX_DIMS for _ in coefficients]
    geometry = _collapsed(shape, layouts)
    if geometry is None:
        return collapse(shape, [c.expand(shape).contiguous() if c is not None else None for c in coefficients])
    sizes, strides = geometry
    return list(sizes), coefficients, [list(st) for st in strides]


def collapse_plan(shape: torch.Size, coefficients: list[Tensor | None], classes_apart: bool = False):
    """`collapse`'s (sizes, coefficients, strides), and None where it used the
    coefficients as given, else a function that collapses a later call's
    coefficients of the same shapes and strides (the materialized case)."""
    sizes, collapsed, strides = collapse(shape, coefficients, classes_apart)
    if all(c is given for c, given in zip(collapsed, coefficients)):
        return sizes, collapsed, strides, None
    return sizes, collapsed, strides, lambda *given: tuple(collapse(shape, list(given), classes_apart)[1])


def signature(t: Tensor | None) -> tuple | None:
    """What a launch plan keys on for an optional tensor argument whose
    shape and strides are read on the host (a coefficient, a scalar): all
    of it but its address, of which only the alignment (Triton specializes a pointer on it)."""
    if t is None:
        return None
    return t.shape, t.stride(), t.dtype, t.data_ptr() % 16


# A training loop calls with the same shapes every step: the merge is
# worked out once per geometry (its loops cost more host time than a launch).
@functools.lru_cache(maxsize=256)
def _collapsed(shape: torch.Size, layouts: tuple, classes_apart: bool = False) -> tuple[tuple, tuple] | None:
    """(sizes, per-coefficient strides) of `collapse` for coefficients of the
    given (shape, strides) or None; None where more than MAX_DIMS remain."""
    strides = [_broadcast_strides(layout, shape) for layout in layouts]
    merged: list[tuple[int, list[int]]] = []
    for i, size in enumerate(shape):
        classes = classes_apart and i == len(shape) - 1
        if size == 1 and not classes:
            continue
        st = [s[i] for s in strides]
        if merged and not classes and all(o == inner * size for o, inner in zip(merged[-1][1], st)):
            merged[-1] = (merged[-1][0] * size, st)
        else:
            merged.append((size, st))
    if len(merged) > MAX_DIMS:
        return None
    pad = MAX_DIMS - len(merged)
    sizes = (1,) * pad + tuple(size for size, _ in merged)
    return sizes, tuple((0,) * pad + tuple(st[k] for _, st in merged) for k in range(len(layouts)))


def ndim(sizes: list[int]) -> int:
    """How many of the collapsed dimensions the kernel must unravel (at least 1)."""
    for k, size in enumerate(sizes):
        if size != 1:
            return MAX_DIMS - k
    return 1
