"""`python -m perf.train_step`: whole training steps (forward, loss, backward,
optimizer) of a multi-label MLP classifier and a CTR-style model with each
loss implementation: step time, the loss's share of it, peak memory."""

import argparse

import pandas as pd
import torch
from torch import nn

from . import _bench
from .sweep_loss import implementations

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


def run(model, inputs, labels, loss_fn, dev, reps):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(inputs), labels, None, None, 0.0, "mean").backward()
        opt.step()

    logits = model(inputs).detach().requires_grad_()

    def loss_only():
        logits.grad = None
        loss_fn(logits, labels, None, None, 0.0, "mean").backward()

    step_ms = _bench.time_ms(step, dev, reps)[0]
    loss_ms = _bench.time_ms(loss_only, dev, reps)[0]
    return step_ms, loss_ms, _bench.peak_memory(step, dev)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: the GPU where there is one)")
    args = parser.parse_args(argv)
    dev = _bench.device(args.device)
    env = _bench.environment(dev)
    print(("GPU" if dev.type == "cuda" else "CPU run (no GPU):") + f" training steps on {env['device']}")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    reps = 20 if dev.type == "cuda" else 5
    rows = []
    for batch, features, classes in GPU_CLASSIFIER if dev.type == "cuda" else CPU_CLASSIFIER:
        model = classifier(features, classes, dev, dtype)
        inputs = torch.randn(batch, features, device=dev, dtype=dtype)
        labels = (torch.rand(batch, classes, device=dev) < 0.05).to(torch.uint8)
        for name, fn in implementations(dev).items():
            step_ms, loss_ms, peak = run(model, inputs, labels, fn, dev, reps)
            rows.append(dict(env, model="mlp_multilabel", impl=name, dtype=str(dtype).replace("torch.", ""), batch=batch, classes=classes,
                             step_ms=step_ms, loss_ms=loss_ms, loss_share=loss_ms / step_ms, peak_mem_bytes=peak))
            print(rows[-1]["model"], name, batch, classes, f"{step_ms:.3f} ms, loss share {loss_ms / step_ms:.1%}")
    for batch, rows_, dim in GPU_CTR if dev.type == "cuda" else CPU_CTR:
        model = CTR(rows_, dim).to(dev)
        ids = torch.randint(0, rows_, (batch, 8), device=dev)
        labels = (torch.rand(batch, 1, device=dev) < 0.1).to(torch.uint8)
        for name, fn in implementations(dev).items():
            step_ms, loss_ms, peak = run(model, ids, labels, fn, dev, reps)
            rows.append(dict(env, model="ctr_embedding_bag", impl=name, dtype="float32", batch=batch, classes=1,
                             step_ms=step_ms, loss_ms=loss_ms, loss_share=loss_ms / step_ms, peak_mem_bytes=peak))
            print(rows[-1]["model"], name, batch, f"{step_ms:.3f} ms, loss share {loss_ms / step_ms:.1%}")
    frame = pd.DataFrame(rows, columns=COLUMNS)
    out = args.out or _bench.results_csv("train_step-", dev)
    frame.to_csv(out, index=False)
    print(f"wrote {len(frame)} rows to {out}")


if __name__ == "__main__":
    main()
