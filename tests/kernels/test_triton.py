"""What kernels/_triton.py relies on in Triton's internals, checked on the
installed Triton: a Triton release that changes one fails here, naming it,
rather than making every launch quietly take JITFunction.run's slower path
(the end-to-end check is tests/kernels/test_launch.py)."""

import inspect
import os
import re

import pytest
import triton
from triton import knobs
from triton.runtime.jit import JITFunction, compute_cache_key

from fused_sigxent.kernels import _triton

KERNELS = os.path.join(os.path.dirname(__file__), "..", "..", "kernels")


def _kernel(x_ptr, n_elements, BLOCK: triton.language.constexpr):
    pass


def _relied_on(condition: bool, what: str) -> None:
    assert condition, f"triton {triton.__version__} changed {what}, which kernels/_triton.py relies on"


def test_jit_function_keeps_its_caches_hooks_and_parameters():
    fn = JITFunction(_kernel)
    for name in ("device_caches", "pre_run_hooks", "params", "arg_names", "debug", "run"):
        _relied_on(hasattr(fn, name), f"JITFunction.{name}")
    _relied_on([p.name for p in fn.params] == ["x_ptr", "n_elements", "BLOCK"], "JITFunction.params")
    _relied_on([p.is_constexpr for p in fn.params] == [False, False, True], "JITFunction.params' is_constexpr")
    run = inspect.signature(JITFunction.run).parameters
    _relied_on({"grid", "warmup"} <= set(run), "JITFunction.run(*args, grid, warmup, **kwargs)")


def test_cache_key_hooks_and_compile_knobs():
    _relied_on(list(inspect.signature(compute_cache_key).parameters) ==
               ["kernel_key_cache", "specialization", "options"], "compute_cache_key's arguments")
    for name in ("launch_enter_hook", "launch_exit_hook", "debug"):
        _relied_on(hasattr(knobs.runtime, name), f"knobs.runtime.{name}")
    _relied_on(hasattr(knobs.compilation, "instrumentation_mode"), "knobs.compilation.instrumentation_mode")


def test_compiled_kernel_loads_handles_and_launches_through_run():
    compiled = triton.compiler.CompiledKernel
    _relied_on(hasattr(compiled, "_init_handles"), "CompiledKernel._init_handles")
    source = inspect.getsource(compiled)
    for name in ("self.run", "self.function", "self.n_regs", "self.n_spills", "packed_metadata"):
        _relied_on(name in source, f"CompiledKernel's {name}")
    _relied_on(issubclass(triton.runtime.OutOfResources, Exception), "triton.runtime.OutOfResources")


def test_only_kernels_triton_touches_triton_internals():
    # One module to read (and fix) when a Triton release moves its internals.
    internal = re.compile(r"\bknobs\b|runtime\.driver|compute_cache_key|device_caches|_init_handles|"
                          r"packed_metadata|\.n_regs\b|\.n_spills\b|pre_run_hooks")
    for name in sorted(os.listdir(KERNELS)):
        if name.endswith(".py") and name != "_triton.py":
            with open(os.path.join(KERNELS, name)) as f:
                hits = [line.strip() for line in f if internal.search(line) and not line.lstrip().startswith("#")]
            assert not hits, f"kernels/{name} uses Triton internals outside kernels/_triton.py: {hits}"


@pytest.mark.parametrize("hook", ["calls", "function", "none"])
def test_hooks_of_either_triton_generation_are_seen(hook, monkeypatch):
    # Triton 3.6 keeps a function (or None) as a launch hook; >= 3.7 keeps a
    # HookChain whose `calls` list is empty when nothing is hooked.
    chain = type("HookChain", (), {"calls": []})()
    value = {"calls": chain, "function": (lambda *a: None), "none": None}[hook]
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", value)
    fn = JITFunction(_kernel)
    assert _triton.hooked(fn) == (hook == "function")
    chain.calls.append(lambda *a: None)
    assert _triton.hooked(fn) == (hook in ("function", "calls"))
