"""fs.siglip_loss(..., group=) and fs.SigLipLoss over 2-4 gloo ranks: each
rank's loss and every gradient (both features, t and b, with losses scaled
differently per rank) against one process's computation on the gathered
tensors in float64; errors on every rank, never a hang; the bytes each rank
sends; per-rank peak memory flat in the world size."""

import pytest
import torch
import torch.nn.functional as F

from perf._dist import run_ranks, time_and_peak

N, D = 5, 3  # rows per rank (ragged: not a power of two), features
CHUNKS = [None, 1, 3]


def _global_batch(world: int, n: int = N, d: int = D, dtype=torch.float64):
    g = torch.Generator().manual_seed(1234)
    x = F.normalize(torch.randn(world * n, d, generator=g, dtype=torch.float64), dim=-1) * 2
    y = F.normalize(torch.randn(world * n, d, generator=g, dtype=torch.float64), dim=-1) * 2
    return x.to(dtype), y.to(dtype)


def _weight(rank: int) -> float:
    """Each rank scales its loss differently: the text gradients must keep them apart."""
    return 1.0 + 0.5 * rank


def _step(rank, world, loss_fn, n=N):
    """One rank's (loss, grad image, grad text, grad t, grad b) of (loss * w_rank).backward()."""
    import torch.distributed as dist

    x, y = _global_batch(world, n)
    x = x[rank * n:(rank + 1) * n].clone().requires_grad_()
    y = y[rank * n:(rank + 1) * n].clone().requires_grad_()
    t = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(x, y, t, b, dist.group.WORLD)
    (loss * _weight(rank)).backward()
    return loss.detach(), x.grad, y.grad, t.grad, b.grad


def _expected(world: int, n: int = N) -> list:
    """Per rank, in one process on the gathered float64 tensors: open_clip's
    rank loss -(1/n) sum_{i of rank} sum_j log sigmoid(l_ij (t x_i y_j + b)),
    and the gradients of sum_r w_r L_r (t and b: each rank its own)."""
    x, y = _global_batch(world, n)
    x.requires_grad_(), y.requires_grad_()
    ts = [torch.tensor(3.0, dtype=torch.float64, requires_grad=True) for _ in range(world)]
    bs = [torch.tensor(-2.0, dtype=torch.float64, requires_grad=True) for _ in range(world)]
    labels = 2 * torch.eye(world * n, dtype=torch.float64) - 1
    losses = []
    for r in range(world):
        rows = slice(r * n, (r + 1) * n)
        logits = ts[r] * x[rows] @ y.T + bs[r]
        losses.append(-F.logsigmoid(labels[rows] * logits).sum() / n)
    sum(loss * _weight(r) for r, loss in enumerate(losses)).backward()
    return [(losses[r].detach(), x.grad[r * n:(r + 1) * n], y.grad[r * n:(r + 1) * n], ts[r].grad, bs[r].grad)
            for r in range(world)]


def _check(got: list, world: int, n: int = N) -> None:
    for r, (ours, want) in enumerate(zip(got, _expected(world, n))):
        for name, a, b in zip(("loss", "image grad", "text grad", "t grad", "b grad"), ours, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"rank {r} {name}: {m}")


def _functional(rank, world):
    import fused_sigxent as fs

    return [_step(rank, world, lambda x, y, t, b, g: fs.siglip_loss(x, y, t, b, chunk_size=chunk, group=g))
            for chunk in CHUNKS]


def _module(rank, world):
    import fused_sigxent as fs

    out = []
    for impl in ("bidir", "shift", None):
        loss = fs.SigLipLoss(rank=rank, world_size=world, dist_impl=impl, chunk_size=2)
        out.append(_step(rank, world, lambda x, y, t, b, g: loss(x, y, t, b, output_dict=True)["contrastive_loss"]))
    return out


def _compiled(rank, world):
    """A model whose loss is the module, under torch.compile (graph breaks at
    the collectives): the eager step's results."""
    import fused_sigxent as fs

    class Towers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loss = fs.SigLipLoss(rank=rank, world_size=world)

        def forward(self, x, y, t, b):
            return self.loss(torch.tanh(x), torch.tanh(y), t, b)

    model = Towers()
    compiled = torch.compile(model, backend="aot_eager")
    return [_step(rank, world, lambda x, y, t, b, g: m(x, y, t, b)) for m in (model, compiled)]


def _bytes_sent(rank, world, n, d):
    """Bytes this rank hands to isend in one forward and one backward."""
    import fused_sigxent as fs
    import torch.distributed as dist

    sent = []
    batch = dist.batch_isend_irecv

    def counting(ops):
        sent.extend(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        return batch(ops)

    dist.batch_isend_irecv = counting
    try:
        x = torch.randn(n, d, requires_grad=True)
        y = torch.randn(n, d, requires_grad=True)
        loss = fs.siglip_loss(x, y, torch.tensor(2.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True),
                              group=dist.group.WORLD)
        forward = sum(sent)
        loss.backward()
    finally:
        dist.batch_isend_irecv = batch
    return forward, sum(sent) - forward


def _peak_memory(rank, world, n, d):
    """Bytes of resident memory above the inputs at this rank's peak, over
    one forward and backward (VmHWM reset just before)."""
    import fused_sigxent as fs
    import torch.distributed as dist

    x = torch.randn(n, d, requires_grad=True)
    y = torch.randn(n, d, requires_grad=True)
    t, b = torch.tensor(5.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
    return time_and_peak(lambda: fs.siglip_loss(x, y, t, b, group=dist.group.WORLD).backward(), barrier=True)[1]


def _errors_on_every_rank(rank, world):
    """What each rank raised: unequal batches, then text requiring grad on
    one rank only, then a peer failing before the ring (the others' wait is
    bounded by the group's timeout). Last: the group is broken after it."""
    import fused_sigxent as fs
    import torch.distributed as dist

    raised = []
    for n, needs in (((4, 3)[rank], (True, True)), (4, (True, False))):
        x = torch.randn(n, D, dtype=torch.float64)
        y = torch.randn(n, D, dtype=torch.float64, requires_grad=needs[rank])
        try:
            fs.siglip_loss(x, y, 1.0, 0.0, group=dist.group.WORLD)
            raised.append(None)
        except ValueError as error:
            raised.append(str(error))
    x = torch.randn(4, D, dtype=torch.float64)
    bad = x.long() if rank == 1 else x  # rank 1's arguments fail its own checks
    try:
        fs.siglip_loss(bad, torch.randn(4, D, dtype=torch.float64), 1.0, 0.0, group=dist.group.WORLD)
        raised.append(None)
    except Exception as error:
        raised.append(type(error).__name__)
    return raised


# Bytes and memory cases: (n, D). The memory case's n x n logits are 16 MiB:
# a rank that kept one block per peer (as an exchange for autograd does)
# would grow by that per peer.
BYTES = (6, 4)
MEMORY = (2048, 16)


def session(rank, world):
    """Everything one group of `world` ranks checks, in one start-up (each
    costs seconds): the cases of the tests below."""
    out = {"functional": _functional(rank, world), "bytes": _bytes_sent(rank, world, *BYTES)}
    if world in (2, 4):
        out["memory"] = _peak_memory(rank, world, *MEMORY)
    if world == 2:
        out["module"] = _module(rank, world)
        out["compiled"] = _compiled(rank, world)
        out["errors"] = _errors_on_every_rank(rank, world)
    return out


ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def sessions():
    """{world: each rank's session results}, for W = 2, 3, 4 (run once)."""
    return {world: run_ranks(world, "test_siglip_ring", "session", env=ENV) for world in (2, 3, 4)}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_rank_gets_the_global_batch_loss_and_gradients(sessions, world):
    for got in zip(*[ranks["functional"] for ranks in sessions[world]]):  # one chunk size at a time
        _check(list(got), world)


def test_the_open_clip_module_is_a_one_line_swap(sessions):
    for got in zip(*[ranks["module"] for ranks in sessions[2]]):
        _check(list(got), 2)


def test_a_model_whose_loss_is_the_module_compiles(sessions):
    for eager, compiled in (r["compiled"] for r in sessions[2]):
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_mismatch_or_a_failing_peer_raises_on_every_rank_never_hangs(sessions):
    ranks = [r["errors"] for r in sessions[2]]
    for unequal, grads, failing in ranks:
        assert "same local batch" in unequal and "n=4" in unequal and "n=3" in unequal
        assert "text grad True" in grads and "text grad False" in grads
    assert ranks[1][2] == "TypeError"  # its own check
    assert ranks[0][2] is not None  # the group's error or timeout, not a hang


@pytest.mark.parametrize("world", [2, 3, 4])
def test_bytes_sent_per_rank_are_the_exchange_s(sessions, world):
    # Forward: the text blocks, W - 1 hops; backward: the image blocks with
    # their (t, b, incoming gradient), W - 1 hops. open_clip's exchange moves
    # 2 (W - 1) n D elements per rank, ours that and 3 (W - 1) scalars.
    n, d = BYTES
    for ranks in sessions[world]:
        forward, backward = ranks["bytes"]
        assert forward == (world - 1) * n * d * 4
        assert backward == (world - 1) * (n * d + 3) * 4


def test_per_rank_peak_memory_does_not_grow_with_the_world(sessions):
    two = max(r["memory"] for r in sessions[2])
    four = max(r["memory"] for r in sessions[4])
    block = MEMORY[0] ** 2 * 4
    assert four <= 1.15 * two + 2**20, (two, four)
    assert four < 2 * block, (four, block)
