"""Launch plans: what a kernel's host function works out once per call
signature (shapes, dtypes, flags, strides and pointer alignments) and
replays on every later call with that signature, the new tensors' addresses
being all that differs.

A training loop calls the loss with the same signature every step. Working
out the layout, the variant, the config and the grid, then going through
Triton's JITFunction.run (argument binding, specialization, cache key),
costs more host time per launch than PyTorch eager's whole loss
(docs/performance.md). A replay is a dictionary lookup and one call of the
compiled kernel's C launcher.
"""

from typing import Callable, NamedTuple

from fused_sigxent.core.plans import PLANS

from . import _triton, _tuner


def launches() -> list[tuple[str, "Launch"]]:
    """(host function, Launch) of every launch plan made so far (keyed by
    the host function's name; a plan's Launch is its `launch`)."""
    return [(key[0], plan.launch) for key, plan in PLANS.items() if isinstance(key[0], str)]


class Launch:
    """One kernel launch with everything but its tensor arguments fixed: the
    grid, the scalar arguments and the constexpr flags.

    The first call goes through `kernel[grid]` (tuning the variant on its
    first launch, as ever). Then Triton's own lookup (binder and cache key,
    `Tuned.lookup`) is asked which compiled kernel those arguments
    select; where it names the kernel JITFunction.run just launched, later
    calls launch that kernel directly (`_triton.DirectLaunch`), with the
    arguments JITFunction.run bound. Where it does not (a Triton whose run
    this lookup does not match), every call keeps going through
    JITFunction.run. So does any call made while a Triton hook is set
    (launch hooks, pre-run hooks, a custom pipeline), since only
    JITFunction.run runs those.

    Tensor arguments must come first in the kernel's parameters (as every
    kernel here has them), and only their addresses may change between
    calls: the plan's key holds everything else Triton specializes on,
    their alignment included (`aligned`). Triton's own compile settings
    (TRITON_DEBUG, instrumentation) are those of the plan's first launch.
    """

    __slots__ = ("kernel", "grid", "scalars", "constexprs", "direct", "checked")

    def __init__(self, kernel, grid, scalars: tuple, constexprs: dict):
        self.kernel, self.grid, self.scalars, self.constexprs = kernel, grid, scalars, constexprs
        self.direct = None  # a _triton.DirectLaunch, once Triton's lookup agreed
        self.checked = False

    def __call__(self, *tensors) -> None:
        direct = self.direct
        if direct is None or not direct(tensors):
            self.through_triton(tensors)

    def through_triton(self, tensors) -> None:
        kernel, args = self.kernel, (*tensors, *self.scalars)
        if not isinstance(kernel, _tuner.Tuned):  # the interpreter's fixed config
            kernel[self.grid](*args, **self.constexprs)
            return
        grid, kwargs = kernel.prepare(args, self.constexprs, self.grid)
        compiled = kernel.fn.run(*args, grid=grid, warmup=False, **kwargs)
        if not self.checked and not _triton.hooked(kernel.fn):
            self.checked = True
            found = kernel.lookup(args, kwargs)
            if found is not None and found[0] is compiled:
                _, bound, device = found
                values = tuple(bound.values())
                if all(a is b for a, b in zip(values, tensors)):
                    self.direct = _triton.DirectLaunch(kernel.fn, compiled, grid, device, values[len(tensors):])

    @property
    def compiled(self):
        """The compiled kernel this plan launches directly, or None."""
        return None if self.direct is None else self.direct.compiled


class LaunchPlan(NamedTuple):
    """A launch plan that is one Launch and the coefficient materializer
    (`layout.collapse_plan`; None: the coefficients as given)."""

    launch: Launch
    collapsed: Callable | None = None


def aligned(t) -> int:
    """A tensor's address modulo 16: Triton specializes a pointer argument on
    whether it is a multiple of 16, so it is part of a plan's key. Tensors
    allocated by torch (outputs, workspaces, constants) always are."""
    return t.data_ptr() % 16
