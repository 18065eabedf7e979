"""Run by tests/test_launch.py in a process of its own (kernels decorated as
for a GPU, TRITON_INTERPRET unset): the kernels compiled for a stand-in
sm_90 driver (perf/host_overhead.py), their launches counted by route.
Prints one JSON object of facts."""

import json
import sys

import torch
import triton

import fused_sigxent as fs
from fused_sigxent.kernels import _tuner
from perf import host_overhead


def main():
    facts = {}
    with host_overhead.stubbed_launches("triton"):
        from fused_sigxent.kernels import sigmoid_ce_fwd, sigmoid_ce_scale

        fwd, scale = sigmoid_ce_fwd._sigmoid_ce_fwd_kernel, sigmoid_ce_scale._sigmoid_ce_scale_kernel
        counts = {"direct": [], "triton": 0}
        jit_run, direct = triton.runtime.jit.JITFunction.run, _tuner.Tuned.launch

        def counted_run(self, *args, **kwargs):
            counts["triton"] += 0 if kwargs.get("warmup") else 1
            return jit_run(self, *args, **kwargs)

        def counted_launch(kernel, bound, stream, grid):
            counts["direct"].append(kernel)
            return direct(kernel, bound, stream, grid)

        triton.runtime.jit.JITFunction.run = counted_run
        _tuner.Tuned.launch = staticmethod(counted_launch)

        def step(x, z):
            fs.binary_cross_entropy_with_logits(x, z, pos_weight=torch.full((16,), 2.0)).backward()

        def routes(x, z):
            counts["direct"].clear()
            counts["triton"] = 0
            step(x, z)
            return len(counts["direct"]), counts["triton"]

        x = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
        z = (torch.rand(8, 16) > 0.5).to(torch.uint8)
        facts["first_call"] = routes(x, z)
        facts["second_call"] = routes(x, z)
        aligned_kernel = counts["direct"][0]
        facts["direct_enabled"] = [fwd.launch_directly, scale.launch_directly]
        # Logits 2 bytes past a 16-byte boundary: Triton specializes the
        # kernel on pointer alignment, so the aligned one must not be reused.
        base = torch.randn(8 * 16 + 1, dtype=torch.bfloat16)
        shifted = base[1:].view(8, 16).requires_grad_()
        facts["shifted_first_call"] = routes(shifted, z)
        facts["shifted_second_call"] = routes(shifted, z)
        facts["shifted_kernel_differs"] = counts["direct"][0] is not aligned_kernel
        # A pre-run hook (Triton runs those in JITFunction.run only): every
        # launch of that kernel goes through JITFunction.run again.
        fwd.fn.add_pre_run_hook(lambda *args, **kwargs: None)
        facts["with_hook"] = routes(x, z)
        fwd.fn.pre_run_hooks.clear()
        # A lookup that disagrees with what JITFunction.run launched turns
        # the direct route off for good.
        lookup = scale.compiled
        scale.cache.clear()
        scale.compiled = lambda args, kwargs: None
        step(x, z)
        scale.compiled = lookup
        facts["after_disagreement"] = [fwd.launch_directly, scale.launch_directly]
        facts["after_disagreement_call"] = routes(x, z)
    json.dump(facts, sys.stdout)


if __name__ == "__main__":
    main()
