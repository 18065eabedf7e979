"""The kernels' grid and memory: index width, the persistent grid, output
templates, and the per-stream workspace of the one-launch reduction."""

import functools
import threading

import torch
from torch import Tensor

from . import _occupancy

# Offsets stay int32 (cheaper divisions for broadcast indexing) while every
# index a program forms, up to numel plus one grid stride, fits in int32.
# A grid stride is at most 2**25 (PersistentGrid.resolve caps the programs).
INT32_LIMIT = 2**31 - 2**25


def template(device: torch.device, dtype: torch.dtype, empty: bool = False) -> Tensor:
    """A tensor for `torch.empty_like` to copy: 0-d (`empty`: 0-size, the
    gradient an op returns where it was not asked for one) in `dtype` on
    `device`. A launch plan keeps its outputs' templates: `empty_like` of
    one costs half of `torch.empty` with dtype and device keywords
    (docs/performance.md). It is a view of the device's workspace, so making
    one allocates nothing (an allocation could land in a CUDA graph's pool,
    see `_new_workspace`), and what `empty_like` makes of it is a tensor of
    its own, in the caller's inference mode (not the plan's)."""
    data = _workspace(device)[1].view(torch.uint8)
    return data[:0].view(dtype) if empty else data[:dtype.itemsize].view(dtype)[0]


def empty_as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """An uninitialized tensor shaped as the contiguous `t` (from `layout.contiguous`),
    contiguous, in `dtype` (bool labels were read as bytes)."""
    return torch.empty_like(t) if t.dtype == dtype else torch.empty(t.shape, dtype=dtype, device=t.device)


# Programs per SM where the compiled kernel's occupancy is not known (a grid
# evaluated outside kernels/_tuner.py): the occupancy of 256-thread programs.
FALLBACK_PROGRAMS_PER_SM = 8
# The interpreter runs programs one after another: a few exercise the
# grid-stride loop and the cross-program reduction.
INTERPRETER_PROGRAMS = 4
# The fewest warps of any candidate in configs/ (tests/kernels/test_configs.py checks
# it): it bounds programs per SM, so the partial sums have room for any grid.
MIN_WARPS = 4


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def max_programs(device: torch.device, per_sm: int | None = None) -> int:
    """Programs of a persistent grid: `per_sm` resident programs (the compiled
    kernel's occupancy) on every SM, `FALLBACK_PROGRAMS_PER_SM` where that is
    unknown; under the interpreter, a few."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return (per_sm or FALLBACK_PROGRAMS_PER_SM) * _occupancy.sm(_index(device)).count


class PersistentGrid:
    """The launch grid for `numel` elements: one program per BLOCK, at most
    `max_programs`, and at least one (an empty reduction still writes its
    loss). kernels/_tuner.py resolves it with the chosen config's occupancy;
    called as a plain Triton grid, it uses the fallback occupancy."""

    __slots__ = ("numel", "device")

    def __init__(self, numel: int, device: torch.device):
        self.numel, self.device = numel, device

    def resolve(self, block: int, per_sm: int | None = None) -> tuple[int]:
        # Never more programs than partial-sum slots (each program writes its
        # own), and a grid stride within the int32 headroom above INT32_LIMIT.
        limit = min(max_programs(self.device, per_sm), partial_slots(self.device), (2**31 - INT32_LIMIT) // block)
        return (max(1, min(-(-self.numel // block), limit)),)

    def __call__(self, meta) -> tuple[int]:
        return self.resolve(meta["BLOCK"])


def persistent_grid(numel: int, device: torch.device) -> PersistentGrid:
    return PersistentGrid(numel, device)


@functools.lru_cache(maxsize=None)
def _partial_slots(device: torch.device) -> int:
    if device.type != "cuda":
        bound = INTERPRETER_PROGRAMS
    else:
        sm = _occupancy.sm(_index(device))
        bound = sm.count * min(sm.max_threads // (32 * MIN_WARPS), _occupancy.MAX_BLOCKS_PER_SM)
    return 1 << (bound - 1).bit_length()


def partial_slots(device: torch.device) -> int:
    """Partial sums kept per quantity: the most programs any candidate's grid
    can have on `device`, rounded up to a power of two, so the last program
    reads them all with one tl.arange."""
    return _partial_slots(device)


# {device, or (CUDA index, stream or "graph"): (ticket, partials, partials as float32)}
_WORKSPACES: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}


def _allocate_workspace(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    # Never inference tensors (a first call under inference_mode): the
    # workspace serves every later call.
    with torch.inference_mode(False):
        partials = torch.empty(3 * partial_slots(device), dtype=torch.float64, device=device)
        return torch.zeros(1, dtype=torch.int32, device=device), partials, partials.view(torch.float32)


def _new_workspace(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """A workspace that lives outside any memory pool the calling thread
    allocates to. torch.compile's CUDA graphs run each graph's first call
    (a warm-up, not a capture, on a stream of their own) with every
    allocation of the thread routed to the graph's pool; a workspace made
    there would stay alive in memory the graphs hand to other tensors. A
    pool takes only its own thread's allocations, so a CUDA workspace is
    made on a thread of its own."""
    if device.type != "cuda":
        return _allocate_workspace(device)
    return _on_own_thread(_allocate_cuda_workspace, device)


def _allocate_cuda_workspace(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    with torch.cuda.device(device):
        made = _allocate_workspace(device)
        # The ticket's zeros are written on this thread's stream: done
        # before any launch on the caller's stream reads them.
        torch.cuda.current_stream(device).synchronize()
    return made


def _on_own_thread(fn, *args):
    """fn(*args) run on a new thread, its result or exception returned or
    raised here."""
    outcome: list = []

    def target():
        try:
            outcome.append((True, fn(*args)))
        except BaseException as error:
            outcome.append((False, error))

    thread = threading.Thread(target=target, name=f"fused_sigxent-{fn.__name__}")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def workspace(device: torch.device, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """(ticket, partials) for the current stream: an int32 counter that the
    last program of a reduction resets to 0 itself, and room for 3 rows of
    `partial_slots` sums in float64 (as float32 for `dtype` float32).

    One per stream: launches on one stream run in order, so they can share
    it; launches on two streams may overlap, so they cannot. A CUDA graph
    capture uses one per device, allocated with the device's first eager
    workspace and never during a capture: memory allocated while capturing
    belongs to the graph's pool, which torch.compile's CUDA graphs reuse for
    other tensors once they think it dead (and a zeroed ticket allocated there
    would not be zeroed at replay). So two graphs replayed at once on two
    streams would share it.
    """
    made = _workspace(device)
    return made[0], made[1] if dtype is torch.float64 else made[2]


def _workspace(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    # Keys: the device itself (the interpreter's CPU), or (CUDA index, raw
    # stream handle as Triton's launcher reads it, or "graph"). Read on
    # every launch, so nothing is made to look one up.
    if device.type != "cuda":
        made = _WORKSPACES.get(device)
        if made is not None:
            return made
        key = device
    elif torch.cuda.is_current_stream_capturing():
        key = (device.index, "graph")
        if key not in _WORKSPACES:
            raise RuntimeError(
                f"fused_sigxent: no reduction workspace for {device} yet, and none can be allocated during a "
                "CUDA graph capture: run the loss once eagerly on this device before capturing")
        return _WORKSPACES[key]
    else:
        key = (device.index, torch._C._cuda_getCurrentRawStream(device.index))
        made = _WORKSPACES.get(key)
        if made is not None:
            return made
    _WORKSPACES[key] = _new_workspace(device)
    if device.type == "cuda":
        _WORKSPACES.setdefault((device.index, "graph"), _new_workspace(device))
    return _WORKSPACES[key]
