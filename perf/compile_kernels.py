"""`python -m perf.compile_kernels`: how many kernels torch.compile generates
for the eager loss expression (impl torch_eager), and for a function calling
our loss (impl fused_sigxent), forward and backward, per case (Inductor's own
count, the kernels TORCH_LOGS=output_code would print). fused_sigxent's CUDA
path launches one each way; on the CPU, 0 for ours means the op stayed opaque
to Inductor (nothing fused), more means Inductor saw and fused the math."""

import argparse
import itertools

import pandas as pd
import torch
from torch._inductor import metrics

from . import _bench
from .sweep_loss import eager_loss, fused_loss, make_inputs

CASES = [("plain", "mean"), ("both+smoothing", "mean"), ("plain", "none"), ("both+smoothing", "none")]


def count(fn) -> int:
    """Kernels Inductor generates while `fn` runs (compiling on first use)."""
    metrics.reset()
    fn()
    return metrics.generated_kernel_count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    dev = _bench.device()
    env = _bench.environment(dev)
    rows = []
    for (feature, reduction), label_dtype, (impl, loss) in itertools.product(
            CASES, [torch.float32, torch.uint8], [("torch_eager", eager_loss), ("fused_sigxent", fused_loss)]):
        x, z, w, p, s = make_inputs(1 << 16, 128, torch.float32, label_dtype, feature, dev)
        torch._dynamo.reset()
        compiled = torch.compile(loss, dynamic=False)
        xg = x.requires_grad_()
        loss_holder = []
        forward = count(lambda: loss_holder.append(compiled(xg, z, w, p, s, reduction)))
        grad = torch.ones_like(loss_holder[0])
        # The backward graph is compiled with the forward's (AOTAutograd),
        # or lazily at the first backward, depending on the version: count
        # both moments and attribute what appears at backward to it.
        backward = count(lambda: loss_holder[0].backward(grad))
        torch._dynamo.reset()
        inference = count(lambda: torch.compile(loss, dynamic=False)(x.detach(), z, w, p, s, reduction))
        rows.append(dict(env, impl=impl, case=f"{feature}/{reduction}",
                         label_dtype=str(label_dtype).replace("torch.", ""), inference_kernels=inference,
                         training_fwd_compile_kernels=forward, training_bwd_compile_kernels=backward))
        print(impl, rows[-1]["case"], rows[-1]["label_dtype"], f"inference {inference}, training: "
              f"{forward} kernels compiled with the forward, {backward} at the backward")
    frame = pd.DataFrame(rows)
    out = args.out or _bench.results_csv("compile_kernels-", dev)
    frame.to_csv(out, index=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
