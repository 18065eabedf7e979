"""Run by tests/kernels/test_launch.py in a process of its own (kernels decorated as
for a GPU, TRITON_INTERPRET unset): the kernels compiled for a stand-in
sm_90 driver (perf/host_overhead.py), their launches (kernels/_launch.py)
counted by route. Prints one JSON object of facts."""

import json
import sys

import torch
import triton

import fused_sigxent as fs
from fused_sigxent.kernels import _launch, _tuner
from perf import host_overhead


def main():
    facts = {}
    with host_overhead.stubbed_launches("triton"):
        from fused_sigxent.kernels import sigmoid_ce_fwd, sigmoid_ce_scale

        fwd, scale = sigmoid_ce_fwd._sigmoid_ce_fwd_kernel, sigmoid_ce_scale._sigmoid_ce_scale_kernel
        counts = {"launches": 0, "triton": 0}
        jit_run, launch_call = triton.runtime.jit.JITFunction.run, _launch.Launch.__call__

        def counted_run(self, *args, **kwargs):
            counts["triton"] += 0 if kwargs.get("warmup") else 1
            return jit_run(self, *args, **kwargs)

        def counted_launch(self, *tensors):
            counts["launches"] += 1
            return launch_call(self, *tensors)

        triton.runtime.jit.JITFunction.run = counted_run
        _launch.Launch.__call__ = counted_launch

        def step(x, z):
            fs.binary_cross_entropy_with_logits(x, z, pos_weight=torch.full((16,), 2.0)).backward()

        def routes(x, z):
            """(direct launches, JITFunction.run launches) of one fwd+bwd."""
            counts["launches"] = counts["triton"] = 0
            step(x, z)
            return counts["launches"] - counts["triton"], counts["triton"]

        def plans(kernel_name):
            return [launch for name, launch in _launch.launches() if name == kernel_name]

        x = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
        z = (torch.rand(8, 16) > 0.5).to(torch.uint8)
        facts["first_call"] = routes(x, z)
        facts["second_call"] = routes(x, z)
        facts["direct_enabled"] = [all(p.direct is not None for p in plans(name))
                                   for name in ("sigmoid_ce_fwd", "sigmoid_ce_scale_")]
        aligned_kernel = plans("sigmoid_ce_fwd")[0].compiled
        # Logits 2 bytes past a 16-byte boundary: Triton specializes the
        # kernel on pointer alignment, so the aligned one must not be reused.
        base = torch.randn(8 * 16 + 1, dtype=torch.bfloat16)
        shifted = base[1:].view(8, 16).requires_grad_()
        facts["shifted_first_call"] = routes(shifted, z)
        facts["shifted_second_call"] = routes(shifted, z)
        facts["fwd_plans"] = len(plans("sigmoid_ce_fwd"))
        facts["shifted_kernel_differs"] = all(p.compiled is not None for p in plans("sigmoid_ce_fwd")) and \
            plans("sigmoid_ce_fwd")[1].compiled is not aligned_kernel
        # A pre-run hook (Triton runs those in JITFunction.run only): every
        # launch of that kernel goes through JITFunction.run again.
        fwd.fn.add_pre_run_hook(lambda *args, **kwargs: None)
        facts["with_hook"] = routes(x, z)
        fwd.fn.pre_run_hooks.clear()
        facts["after_hook"] = routes(x, z)
        # A lookup that disagrees with what JITFunction.run launched keeps
        # that plan's launches on JITFunction.run for good.
        lookup = _tuner.Tuned.lookup
        _launch.PLANS.clear()
        _tuner.Tuned.lookup = lambda self, args, kwargs: None if self is scale else lookup(self, args, kwargs)
        step(x, z)
        _tuner.Tuned.lookup = lookup
        facts["after_disagreement"] = [all(p.direct is not None for p in plans(name))
                                       for name in ("sigmoid_ce_fwd", "sigmoid_ce_scale_")]
        facts["after_disagreement_call"] = routes(x, z)
    json.dump(facts, sys.stdout)


if __name__ == "__main__":
    main()
