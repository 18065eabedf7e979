"""DTensor inputs: sharded on the batch or the class dimension, or replicated,
the loss and every gradient equal the unsharded computation. Two CPU ranks
over gloo on the loopback interface, spawned by the test."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, backend: str) -> None:
    os.environ["FUSED_SIGXENT_BACKEND"] = backend
    # gloo picks the host's first interface unless told: keep it on loopback.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}")
    try:
        _check_every_placement()
    finally:
        dist.destroy_process_group()


def _check_every_placement() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fused_sigxent as fs

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)  # the same full tensors on every rank
    # (6, 4): both dimensions split evenly over two ranks; 5 would not, which
    # DTensor allows (uneven shards), so (5, 4) is checked on the batch too.
    for shape in [(6, 4), (5, 4)]:
        x, z = torch.randn(shape, dtype=torch.float64) * 3, torch.rand(shape, dtype=torch.float64)
        # Where the formulas' pieces meet (zero logits, hard labels, a zero
        # weight): autograd differentiates the DTensor route's plain ops there.
        x.view(-1)[::3] = 0
        z.view(-1)[1::3] = 1.0
        w, p = torch.rand(shape[-1], dtype=torch.float64) + 0.1, torch.rand(shape[-1], dtype=torch.float64) + 0.5
        w[1] = 0
        layouts = [(Shard(0), Replicate()), (Replicate(), Replicate())]
        if shape[1] % WORLD == 0:
            layouts += [(Shard(1), Shard(0)), (Shard(1), Replicate())]
        losses = {
            "mean": lambda x, z, w, p: fs.binary_cross_entropy_with_logits(x, z, w, "mean", p, label_smoothing=0.1),
            "sum": lambda x, z, w, p: fs.binary_cross_entropy_with_logits(x, z, w, "sum", p),
            "none": lambda x, z, w, p: fs.binary_cross_entropy_with_logits(x, z, w, "none", p).sum(),
            "tf MEAN": lambda x, z, w, p: fs.sigmoid_cross_entropy(z, x, w[None], 0.2, fs.Reduction.MEAN),
            "tf nonzero": lambda x, z, w, p: fs.sigmoid_cross_entropy(z, x, w[None]),
        }
        for (placement, coefficient_placement) in layouts:
            for name, loss_fn in losses.items():
                where = f"{shape} {placement} weights {coefficient_placement} {name}"
                full = [t.clone().requires_grad_() for t in (x, z, w, p)]
                sharded = [distribute_tensor(t, mesh, [placement]).requires_grad_() for t in (x, z)]
                sharded += [distribute_tensor(t, mesh, [coefficient_placement]).requires_grad_() for t in (w, p)]
                expected = loss_fn(*full)
                expected.backward()
                loss = loss_fn(*sharded)
                loss.backward()
                torch.testing.assert_close(loss.full_tensor(), expected.detach(), msg=where)
                for got, want, arg in zip(sharded, full, "xzwp"):
                    if want.grad is not None:
                        torch.testing.assert_close(got.grad.full_tensor(), want.grad, msg=f"{where} grad {arg}")
        # And against PyTorch's own loss on the same DTensors.
        xs = distribute_tensor(x, mesh, [Shard(0)])
        torch.testing.assert_close(
            fs.binary_cross_entropy_with_logits(xs, distribute_tensor(z, mesh, [Shard(0)])).full_tensor(),
            F.binary_cross_entropy_with_logits(x, z))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dtensor_placements_give_the_unsharded_loss_and_gradients(backend):
    mp.spawn(_worker, args=(_free_port(), backend), nprocs=WORLD)
