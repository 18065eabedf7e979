"""First-call tuning of a Triton kernel over its configs/ candidates, cached
per variant, with the persistent grid sized by the chosen config's occupancy."""

import operator
import threading
from dataclasses import dataclass

import torch
import triton

from . import _grid, _occupancy, _triton


_DTYPE = operator.attrgetter("dtype")


def time_ms(call) -> float:
    """Median time of `call` (triton.testing.do_bench: CUDA events, L2 flushed)."""
    return triton.testing.do_bench(call, return_mode="median")


@dataclass(frozen=True)
class Choice:
    """A compiled candidate: its launch options (BLOCK, num_warps, ...), its
    resident programs per SM (None where unknown: not a CUDA device), its
    spills and the fraction of the SM's thread slots it fills."""

    options: dict
    per_sm: int | None
    spills: int = 0
    occupancy: float = 1.0


class Tuned(triton.runtime.KernelInterface):
    """`kernel[grid](*args, **constexprs)` as for a JITFunction. The first
    launch of each variant (device, numel class, constexpr flags, tensor
    dtypes: everything that changes the compiled code or its best config)
    compiles every candidate, drops those that spill or cannot reach
    `_occupancy.MIN_OCCUPANCY` (unless none can), times the rest if `timed`,
    and caches the winner; later launches only look it up. First launches are
    serialized by a lock, so two threads never tune (or time) at once.

    A `_grid.PersistentGrid` is resolved with the winner's programs per SM,
    the same for every launch of the variant, so reductions stay bitwise
    deterministic run after run."""

    def __init__(self, fn, candidates, timed: bool = True, numel_class_arg: str = "numel_class",
                 dtype_arg: str | None = None, overwrites: dict[str, str] | None = None):
        self.fn = fn
        self.name = getattr(fn, "__name__", repr(fn))
        self.arg_names = fn.arg_names
        self.candidates = candidates
        self.timed = timed
        self.cache: dict[tuple, Choice] = {}
        self.lock = threading.Lock()
        # What the candidates set (BLOCK, num_warps, ...) is chosen here, not
        # part of the variant. Constexpr flags arrive by name (every launcher
        # here passes them so); pointers are the arguments named *_ptr
        # (STYLE.md), all tensors.
        tuned_names = {name for options in candidates(0, 0) for name in options}
        self.flag_names = [p.name for p in fn.params if p.is_constexpr and p.name not in tuned_names]
        pointers = [i for i, p in enumerate(fn.params) if not p.is_constexpr and p.name.endswith("_ptr")]
        self.pointers = operator.itemgetter(*pointers) if len(pointers) > 1 else lambda args: (args[pointers[0]],)
        self.numel_class_pos = self.arg_names.index(numel_class_arg) if numel_class_arg in self.arg_names else None
        self.dtype_pos = self.arg_names.index(dtype_arg) if dtype_arg in self.arg_names else None
        # {output pointer: input pointer} pairs a launch may pass the same
        # tensor for (an output written over its input): timing repeats the
        # launch, so the input is saved first and restored after.
        self.overwrites = [(self.arg_names.index(o), self.arg_names.index(i)) for o, i in (overwrites or {}).items()]

    def key(self, args, kwargs) -> tuple:
        """Device, numel class, every constexpr flag, the pointers' dtypes.
        Built on every launch, so kept to a few C-level calls."""
        tensors = self.pointers(args)
        size_class = args[self.numel_class_pos] if self.numel_class_pos is not None else 0
        return (tensors[0].device, size_class, tuple(map(kwargs.get, self.flag_names)), tuple(map(_DTYPE, tensors)))

    def prepare(self, args, kwargs, grid) -> tuple[tuple, dict]:
        """(grid, keyword arguments) of a launch: the variant's config (tuned
        on its first launch) added to `kwargs` (not modified), and the grid
        resolved with that config's occupancy."""
        key = self.key(args, kwargs)
        choice = self.cache.get(key)
        if choice is None:
            choice = self.tune(key, args, grid, kwargs)
        if isinstance(grid, _grid.PersistentGrid):
            grid = grid.resolve(choice.options["BLOCK"], choice.per_sm)
        return grid, {**kwargs, **choice.options}

    def run(self, *args, grid, warmup=False, **kwargs):
        grid, kwargs = self.prepare(args, kwargs, grid)
        return self.fn.run(*args, grid=grid, warmup=warmup, **kwargs)

    def lookup(self, args, kwargs):
        """(compiled kernel, bound arguments, device) that JITFunction.run
        would pick for these arguments (`_triton.cached_kernel`), or None."""
        return _triton.cached_kernel(self.fn, args, kwargs)

    def tune(self, key, args, grid, kwargs) -> Choice:
        with self.lock:
            if key in self.cache:
                return self.cache[key]
            device = key[0]
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    f"fused_sigxent: {self.name} has not run yet for this variant ({key[1:]}), and "
                    "choosing its config compiles and times kernels, which a CUDA graph capture cannot hold: "
                    "run the loss once eagerly with the same dtypes and options before capturing")
            size_class = key[1]
            elem_bytes = args[self.dtype_pos].element_size() if self.dtype_pos is not None else 0
            compiled = [c for c in (self.compile(device, args, kwargs, o)
                                    for o in self.candidates(size_class, elem_bytes)) if c is not None]
            if not compiled:
                raise RuntimeError(f"fused_sigxent: no candidate of {self.name} fits {device}")
            keep = [c for c in compiled if c.spills == 0 and c.occupancy >= _occupancy.MIN_OCCUPANCY]
            if not keep:
                best = max((-c.spills, c.occupancy) for c in compiled)
                keep = [c for c in compiled if (-c.spills, c.occupancy) == best]
            choice = keep[0]
            if self.timed and len(keep) > 1:
                if isinstance(grid, _grid.PersistentGrid):
                    grids = [grid.resolve(c.options["BLOCK"], c.per_sm) for c in keep]
                else:
                    grids = [grid] * len(keep)
                saved = [(args[i], args[i].clone()) for o, i in self.overwrites
                         if args[o].data_ptr() == args[i].data_ptr()]
                try:
                    times = [time_ms(lambda c=c, g=g: self.fn.run(*args, grid=g, warmup=False, **kwargs, **c.options))
                             for c, g in zip(keep, grids)]
                finally:  # also when timing fails (out of memory for do_bench's cache flush)
                    for tensor, original in saved:
                        tensor.copy_(original)
                choice = keep[times.index(min(times))]
            self.cache[key] = choice
            return choice

    def compile(self, device, args, kwargs, options) -> Choice | None:
        """Compiles one candidate without launching it; None if it cannot
        run on this device (too many threads, registers or shared memory)."""
        kernel = _triton.compiled(self.fn.run(*args, grid=(1,), warmup=True, **kwargs, **options))
        if device.type != "cuda":
            return Choice(options, None)
        try:
            registers, spills, num_warps, shared, warp_size = _triton.resources(kernel)
        except _triton.OutOfResources:
            return None
        sm = _occupancy.sm(device.index if device.index is not None else torch.cuda.current_device())
        per_sm = _occupancy.programs_per_sm(sm, registers, num_warps, shared, warp_size)
        if per_sm == 0:
            return None
        return Choice(options, per_sm, spills, _occupancy.occupancy(sm, per_sm, num_warps, warp_size))
