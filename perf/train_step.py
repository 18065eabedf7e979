"""`python -m perf.train_step`: whole training steps (forward, loss, backward,
optimizer) of a multi-label MLP classifier and a CTR-style model with each
loss implementation: step time, the loss's share of it, peak memory.

Implementations: `fused_sigxent` and `torch_eager` in an eager step;
`torch_compile` and `fused_sigxent_compile` compile the step's forward
(model and loss, one torch.compile; AOTAutograd compiles its backward), as a
user compiling a model with its loss does. Peak memory is a step's peak
above the model, its inputs and labels (perf/_memory.py: CUDA's allocator on
a GPU; on the CPU, resident memory in a fresh process per model x
implementation)."""

import argparse
import time

import pandas as pd
import torch
from torch import nn

from . import _bench, _memory
from .sweep_loss import IMPLS, eager_loss, fused_loss, implementations

# (batch, features, classes): GPU batches up to 64k and classes up to 100k, not
# both at once (65536 x 100000 bf16 logits alone are 13 GB, and PyTorch eager's
# loss makes several temporaries of that size); CPU sizes for CI's machine.
GPU_CLASSIFIER = [(4096, 512, 1000), (65536, 512, 1000), (16384, 512, 10000), (16384, 512, 100000)]
CPU_CLASSIFIER = [(256, 64, 1000)]
GPU_CTR = [(65536, 1 << 20, 64)]  # (batch, embedding rows, embedding dim)
CPU_CTR = [(4096, 1 << 14, 16)]
COLUMNS = ["device", "torch_version", "triton_version", "commit", "model", "impl", "dtype", "batch", "classes",
           "step_ms", "loss_ms", "loss_share", "peak_mem_bytes"]


def classifier(features, classes, dev, dtype):
    return nn.Sequential(nn.Linear(features, 1024), nn.ReLU(), nn.Linear(1024, classes)).to(dev, dtype)


class CTR(nn.Module):
    """Embedding bag over sparse ids, then an MLP to one logit."""

    def __init__(self, rows, dim):
        super().__init__()
        self.bag = nn.EmbeddingBag(rows, dim, mode="sum")
        self.mlp = nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, 1))

    def forward(self, ids):
        return self.mlp(self.bag(ids))


def build(model_name, size, dev, dtype):
    """(model, inputs, labels) of one row, from a fixed seed (a memory child
    builds the same)."""
    torch.manual_seed(0)
    if model_name == "mlp_multilabel":
        batch, features, classes = size
        model = classifier(features, classes, dev, dtype)
        inputs = torch.randn(batch, features, device=dev, dtype=dtype)
        labels = (torch.rand(batch, classes, device=dev) < 0.05).to(torch.uint8)
    else:
        batch, rows, dim = size
        model = CTR(rows, dim).to(dev)
        inputs = torch.randint(0, rows, (batch, 8), device=dev)
        labels = (torch.rand(batch, 1, device=dev) < 0.1).to(torch.uint8)
    return model, inputs, labels


def step_fn(model, inputs, labels, impl):
    """One training step with `impl`'s loss: zero_grad, forward and loss
    (compiled together for the *_compile implementations), backward, SGD."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = eager_loss if impl in ("torch_eager", "torch_compile") else fused_loss

    def forward(inputs, labels):
        return loss_fn(model(inputs), labels, None, None, 0.0, "mean")

    if impl.endswith("_compile"):
        forward = torch.compile(forward, dynamic=False)

    def step():
        opt.zero_grad(set_to_none=True)
        forward(inputs, labels).backward()
        opt.step()

    return step


def run(model, inputs, labels, impl, loss_fn, dev, reps):
    """(step ms, loss ms): a whole step, and the loss's forward and backward
    alone on the model's logits (`loss_fn`, compiled for *_compile)."""
    step = step_fn(model, inputs, labels, impl)
    logits = model(inputs).detach().requires_grad_()

    def loss_only():
        logits.grad = None
        loss_fn(logits, labels, None, None, 0.0, "mean").backward()

    step_ms = _bench.time_ms(step, dev, reps)[0]
    loss_ms = _bench.time_ms(loss_only, dev, reps)[0]
    return step_ms, loss_ms


def memory_child(model, size, impl, device="cpu"):
    """In a fresh process (perf._memory): a step's peak above the model,
    inputs and labels, after one warm-up step. {"step": bytes}."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" and model == "mlp_multilabel" else torch.float32
    step = step_fn(*build(model, tuple(size), dev, dtype), impl)
    step()
    return {"step": _memory.rss_peak(step) if dev.type == "cpu" else _memory.cuda_peak(step, dev)}


def main(argv=None):
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: the GPU where there is one)")
    parser.add_argument("--impl", default=None, help=f"comma-separated: {', '.join(IMPLS)}")
    parser.add_argument("--no-memory", action="store_true", help="leave peak_mem_bytes empty")
    args = parser.parse_args(argv)
    dev = _bench.device(args.device)
    env = _bench.environment(dev)
    impls = args.impl.split(",") if args.impl else IMPLS
    print(("GPU" if dev.type == "cuda" else "CPU-only run (no GPU):") + f" training steps on {env['device']}")
    reps = 20 if dev.type == "cuda" else 10
    memory = not args.no_memory and (dev.type == "cuda" or _memory.rss_available())
    gpu = dev.type == "cuda"
    runs = [("mlp_multilabel", size, torch.bfloat16 if gpu else torch.float32, size[0], size[2])
            for size in (GPU_CLASSIFIER if gpu else CPU_CLASSIFIER)]
    runs += [("ctr_embedding_bag", size, torch.float32, size[0], 1) for size in (GPU_CTR if gpu else CPU_CTR)]
    rows, specs = [], []
    for model_name, size, dtype, batch, classes in runs:
        model, inputs, labels = build(model_name, size, dev, dtype)
        for name, loss_fn in implementations(dev, impls).items():
            step_ms, loss_ms = run(model, inputs, labels, name, loss_fn, dev, reps)
            peak = None
            if memory and gpu:
                peak = memory_child(model_name, size, name, str(dev))["step"]
            elif memory:
                specs.append(dict(model=model_name, size=list(size), impl=name))
            rows.append(dict(env, model=model_name, impl=name, dtype=str(dtype).replace("torch.", ""), batch=batch,
                             classes=classes, step_ms=step_ms, loss_ms=loss_ms, loss_share=loss_ms / step_ms,
                             peak_mem_bytes=peak))
            print(model_name, name, batch, classes, f"{step_ms:.3f} ms, loss {loss_ms:.3f} ms, "
                  f"share {loss_ms / step_ms:.1%}", flush=True)
    if specs:
        print(f"peak memory: {len(specs)} child processes", flush=True)
        for row, peaks in zip(rows, _memory.run_children("train_step", specs)):
            row["peak_mem_bytes"] = peaks.get("step")
            print(row["model"], row["impl"], f"peak {row['peak_mem_bytes'] / 2**20:.1f} MiB"
                  if row["peak_mem_bytes"] is not None else "peak: failed")
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["peak_mem_bytes"] = frame["peak_mem_bytes"].astype("Int64")
    out = args.out or _bench.results_csv("train_step-", dev)
    frame.to_csv(out, index=False)
    print(f"wrote {len(frame)} rows to {out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
