"""Every use of Triton's internals, behind a few small functions: the cache
lookup and direct launch that let a launch plan skip JITFunction.run, and
the compiled kernel's resources the tuner reads. tests/kernels/test_triton.py
fails, naming the attribute, where a Triton version changes one of them."""

import triton
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import compute_cache_key

OutOfResources = triton.runtime.OutOfResources


def hooked(fn) -> bool:
    """Whether JITFunction.run has a hook to run for `fn` (pre-run hooks,
    launch enter/exit hooks, a stages-inspection hook), which a direct
    launch would skip."""
    runtime = knobs.runtime
    return (bool(fn.pre_run_hooks) or _set(runtime.launch_enter_hook) or _set(runtime.launch_exit_hook)
            or getattr(runtime, "add_stages_inspection_hook", None) is not None)


def _set(hook) -> bool:
    """Whether a launch hook is set: a function (Triton 3.6), or a chain
    with calls in it (Triton >= 3.7 keeps an empty HookChain there)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def cached_kernel(fn, args, kwargs):
    """(compiled kernel, bound arguments, device) that JITFunction.run would
    pick for these arguments, by Triton's own binder and cache key (so
    specialization is Triton's); None where this lookup does not apply (the
    interpreter, a hook, nothing compiled yet). A caller compares it with
    what JITFunction.run launched before trusting it."""
    if not hasattr(fn, "device_caches") or getattr(knobs.runtime, "add_stages_inspection_hook", None) is not None:
        return None
    device = driver.active.get_current_device()
    caches = fn.device_caches.get(device)
    if caches is None:
        return None
    kernel_cache, kernel_key_cache, _target, _backend, binder = caches
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # triton >= 3.7
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound, specialization, options = binder(*args, **kwargs)
    kernel = kernel_cache.get(compute_cache_key(kernel_key_cache, specialization, options))
    if kernel is None or hasattr(kernel, "result"):  # absent, or still compiling asynchronously
        return None
    return kernel, bound, device


class DirectLaunch:
    """A compiled kernel launched through its C launcher, with what
    JITFunction.run would pass when no hook is set: the grid, the current
    stream, no launch metadata, the hooks as they are (unset)."""

    __slots__ = ("fn", "compiled", "run", "function", "metadata", "grid", "get_stream", "device", "tail")

    def __init__(self, fn, compiled, grid: tuple, device, tail: tuple):
        compiled._init_handles()
        self.fn, self.compiled = fn, compiled
        self.run, self.function, self.metadata = compiled.run, compiled.function, compiled.packed_metadata
        self.grid = (*grid, 1, 1)[:3]
        self.get_stream, self.device, self.tail = driver.active.get_current_stream, device, tail

    def __call__(self, tensors) -> bool:
        """Launches on `tensors` (the other arguments are the plan's), and
        True; False, launching nothing, where a hook is now set."""
        runtime = knobs.runtime
        enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
        if self.fn.pre_run_hooks or _set(enter) or _set(exit_) or getattr(runtime, "add_stages_inspection_hook",
                                                                          None) is not None:
            return False
        g0, g1, g2 = self.grid
        self.run(g0, g1, g2, self.get_stream(self.device), self.function, self.metadata, None, enter, exit_,
                 *tensors, *self.tail)
        return True


def compiled(kernel):
    """The compiled kernel of a warmup run (Triton >= 3.7 may return a future)."""
    return kernel.result() if hasattr(kernel, "result") else kernel


def resources(kernel) -> tuple[int, int, int, int, int]:
    """(registers per thread, spills, num_warps, shared memory bytes, warp
    size) of a compiled kernel, its handles loaded (OutOfResources where it
    cannot run on the device)."""
    kernel._init_handles()
    metadata = kernel.metadata
    return (getattr(kernel, "n_regs", 0), getattr(kernel, "n_spills", 0), metadata.num_warps,
            getattr(metadata, "shared", 0), getattr(metadata, "warp_size", 32))
