"""Host-side layout for the kernels: contiguous logits/labels, broadcast
coefficients collapsed to at most four strided dimensions, index width, and
the per-stream workspace of the one-launch reduction."""

import functools

import torch
from torch import Tensor

MAX_DIMS = 4
# Offsets stay int32 (cheaper divisions for broadcast indexing) while every
# index a program forms, up to numel plus one grid stride, fits in int32.
# A grid stride is at most max_programs * BLOCK < 2**25 (configs/ keeps BLOCK <= 16384).
INT32_LIMIT = 2**31 - 2**25


def contiguous(t: Tensor) -> Tensor:
    """The one copy the kernels make: non-contiguous logits, labels or incoming
    gradients are copied once; contiguous ones are used as they are. Bool
    labels are read as bytes."""
    t = t.contiguous()
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def collapse(shape: torch.Size, coefficients: list[Tensor | None]) -> tuple[list[int], list[Tensor | None], list[list[int]]]:
    """Sizes (d0..d3, outermost first, padded with 1) of the logits' shape after
    merging every pair of adjacent dimensions that all coefficients traverse
    contiguously; the coefficients; and each one's strides over those
    dimensions (0 where it is broadcast).

    (B, C) logits with a (1, C) weight stay (B, C) with weight strides (0, 1);
    a (B, 1) per-sample weight over (B, 1) logits collapses to one dimension.
    More than four dimensions remain only for interleaved broadcasts of rank
    5 or more; those coefficients are made contiguous at full size (the one
    case where a broadcast coefficient is materialized).
    """
    strides = [list(c.expand(shape).stride()) if c is not None else [0] * len(shape) for c in coefficients]
    merged: list[tuple[int, list[int]]] = []
    for i, size in enumerate(shape):
        if size == 1:
            continue
        st = [s[i] for s in strides]
        if merged and all(o == inner * size for o, inner in zip(merged[-1][1], st)):
            merged[-1] = (merged[-1][0] * size, st)
        else:
            merged.append((size, st))
    if len(merged) > MAX_DIMS:
        return collapse(shape, [c.expand(shape).contiguous() if c is not None else None for c in coefficients])
    pad = MAX_DIMS - len(merged)
    sizes = [1] * pad + [size for size, _ in merged]
    per_coefficient = [[0] * pad + [st[k] for _, st in merged] for k in range(len(coefficients))]
    return sizes, coefficients, per_coefficient


def ndim(sizes: list[int]) -> int:
    """How many of the collapsed dimensions the kernel must unravel (at least 1)."""
    for k, size in enumerate(sizes):
        if size != 1:
            return MAX_DIMS - k
    return 1


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def max_programs(device: torch.device) -> int:
    """Programs of a persistent grid: enough to fill the GPU (8 per SM, the
    occupancy of 256-thread programs); under the interpreter, a few."""
    if device.type != "cuda":
        return 4
    return 8 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def persistent_grid(numel: int, device: torch.device):
    """The launch grid for `numel` elements: one program per BLOCK, at most
    `max_programs`, and at least one (an empty reduction still writes its loss)."""
    limit = max_programs(device)

    def grid(meta):
        return (max(1, min(-(-numel // meta["BLOCK"]), limit)),)

    return grid


def partial_slots(device: torch.device) -> int:
    """Partial sums kept per quantity: max_programs rounded up to a power of
    two, so the last program reads them all with one tl.arange."""
    return 1 << (max_programs(device) - 1).bit_length()


_WORKSPACES: dict[tuple, tuple[Tensor, Tensor]] = {}


def _new_workspace(device: torch.device) -> tuple[Tensor, Tensor]:
    return (
        torch.zeros(1, dtype=torch.int32, device=device),
        torch.empty(3 * partial_slots(device), dtype=torch.float64, device=device),
    )


def workspace(device: torch.device) -> tuple[Tensor, Tensor]:
    """(ticket, partials) for the current stream: an int32 counter that the
    last program of a reduction resets to 0 itself, and room for 3 rows of
    `partial_slots` sums in float64 (viewed as float32 for float32 math).

    One per stream: launches on one stream run in order, so they can share
    it; launches on two streams may overlap, so they cannot. A CUDA graph
    capture uses one per device, allocated with the device's first eager
    workspace: memory allocated during a capture belongs to the graph's pool,
    which torch.compile's CUDA graphs reuse for other tensors once they think
    it dead. (So two graphs replayed at once on two streams would share it.)
    """
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing:
        key = (device.type, device.index, "graph")
    else:
        key = (device.type, device.index, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = _new_workspace(device)
        if device.type == "cuda" and not capturing:
            _WORKSPACES.setdefault((device.type, device.index, "graph"), _new_workspace(device))
    return _WORKSPACES[key]
