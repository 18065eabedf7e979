"""Sharded losses (DTensor logits on a 1-D mesh) and the class-parallel fused
linear head, on 2 and 3 gloo ranks: every layout against one process's
result on the full tensors in float64; the fused op on the local shards and
no elementwise op at full shard size; per-rank peak memory; layouts not
supported raise, naming the placement."""

import pytest
import torch
import torch.nn.functional as F

from perf._dist import run_ranks, time_and_peak

ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1", "FUSED_SIGXENT_BACKEND": "triton"}


def _full(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    z = torch.rand(shape, generator=g, dtype=torch.float64)
    x.view(-1)[::5] = 0  # where the formulas' pieces meet
    z.view(-1)[1::4] = 1.0
    return x, z


LOSSES = {
    "mean": lambda x, z, w, p: __import__("fused_sigxent").binary_cross_entropy_with_logits(
        x, z, w, "mean", p, label_smoothing=0.1),
    "sum": lambda x, z, w, p: __import__("fused_sigxent").binary_cross_entropy_with_logits(x, z, w, "sum", p),
    "none": lambda x, z, w, p: __import__("fused_sigxent").binary_cross_entropy_with_logits(x, z, w, "none", p),
    "tf MEAN": lambda x, z, w, p: __import__("fused_sigxent").sigmoid_cross_entropy(
        z, x, w, 0.2, __import__("fused_sigxent").Reduction.MEAN),
    "tf nonzero": lambda x, z, w, p: __import__("fused_sigxent").sigmoid_cross_entropy(z, x, w),
    "focal": lambda x, z, w, p: __import__("fused_sigxent").sigmoid_focal_loss(x, z, 0.25, 1.5, "mean", weight=w),
}


def _layouts(shape):
    """(logits placement, what the weight is, its placement, per-class pos_weight's placement) to check."""
    from torch.distributed.tensor import Replicate, Shard

    last = len(shape) - 1
    out = [(Replicate(), "class", Replicate(), Replicate())]
    for d in range(len(shape)):
        out.append((Shard(d), "class", Shard(0) if d == last else Replicate(), Shard(0) if d == last else Replicate()))
        out.append((Shard(d), "full", Shard(d), Replicate()))  # a full-shape weight sharded alike
        out.append((Shard(d), "full", Replicate(), Replicate()))  # ... or replicated, sliced
    return out


def _sharded_losses(rank, world):
    """[(where, loss, expected loss, grads, expected grads, placements ok)] for every layout and loss."""
    import fused_sigxent as fs  # noqa: F401
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out = []
    # (5, 3, 7) over 2 or 3 ranks: every dimension splits unevenly.
    shape = (5, 3, 7)
    x, z = _full(shape)
    for placement, kind, w_placement, p_placement in _layouts(shape):
        w = (torch.rand(shape[-1] if kind == "class" else shape, dtype=torch.float64) + 0.1)
        w.view(-1)[1] = 0
        p = torch.rand(shape[-1], dtype=torch.float64) + 0.5
        for name, loss_fn in LOSSES.items():
            if name.startswith("tf") and kind == "class":
                w_use = w.reshape(1, 1, -1)  # TF's rule: a (1, 1, C) weight
            else:
                w_use = w
            full = [t.clone().requires_grad_() for t in (x, z, w_use, p)]
            sharded = [distribute_tensor(t, mesh, [placement]).requires_grad_() for t in (x, z)]
            wp = w_placement if w_use.dim() == w.dim() else (
                type(w_placement)(w_placement.dim + 2) if hasattr(w_placement, "dim") else w_placement)
            sharded += [distribute_tensor(full[2].detach(), mesh, [wp]).requires_grad_(),
                        distribute_tensor(p, mesh, [p_placement]).requires_grad_()]
            if name == "focal":
                full[1] = (full[1].detach() > 0.5).double()
                sharded[1] = distribute_tensor(full[1], mesh, [placement])
            expected = loss_fn(*full)
            loss = loss_fn(*sharded)
            where = f"{placement} {kind} weight {wp} pos_weight {p_placement} {name}"
            upstream = torch.linspace(0.5, 1.5, expected.numel(), dtype=torch.float64).reshape(expected.shape)
            (expected * upstream).sum().backward()
            ok = isinstance(loss, DTensor) and (
                tuple(loss.placements) == (tuple(sharded[0].placements) if name == "none" else (Replicate(),)))
            (loss * distribute_tensor(upstream, mesh, list(loss.placements))).sum().backward()
            grads = [None if t.grad is None else t.grad.full_tensor() for t in sharded]
            grad_placements = [t.grad is None or tuple(t.grad.placements) == tuple(t.placements) or
                               t.grad.placements[0].is_partial() for t in sharded]
            out.append((where, loss.full_tensor(), expected.detach(), grads, [t.grad for t in full],
                        ok and all(grad_placements)))
    return out


def _class_index_focal(rank, world):
    """The focal loss's class-index targets: global ids, replicated or sharded
    like the logits' rows, with class-sharded logits too."""
    import fused_sigxent as fs
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    x, _ = _full((7, 5))
    ids = torch.tensor([0, 4, -1, 5, 2, 2, 3])  # -1 and C = 5: no positive
    out = []
    for xp, ip in [(Shard(0), Shard(0)), (Shard(1), Replicate()), (Replicate(), Replicate())]:
        xs = distribute_tensor(x, mesh, [xp]).requires_grad_()
        loss = fs.sigmoid_focal_loss(xs, distribute_tensor(ids, mesh, [ip]), 0.25, 2.0, "sum")
        loss.backward()
        xf = x.clone().requires_grad_()
        want = fs.sigmoid_focal_loss(xf, ids, 0.25, 2.0, "sum")
        want.backward()
        out.append((f"{xp} ids {ip}", loss.full_tensor(), want.detach(), xs.grad.full_tensor(), xf.grad))
    return out


def _ops_on_shards(rank, world):
    """(op name, output numel) of every op a sharded loss dispatches, and the local shard's numel."""
    import fused_sigxent as fs
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            first = out[0] if isinstance(out, (tuple, list)) and out else out
            numel = first.numel() if isinstance(first, torch.Tensor) else 0
            if str(func).startswith("fused_sigxent."):  # the fused op: its input's size
                numel = args[0].numel() if str(func) != "fused_sigxent.sigmoid_ce_scale_.default" else args[1].numel()
            self.seen.append((str(func), numel))
            return out

    mesh = init_device_mesh("cpu", (world,))
    x, z = _full((8, 64))
    xs = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
    zs = distribute_tensor(z, mesh, [Shard(1)])
    w = distribute_tensor(torch.rand(64, dtype=torch.float64), mesh, [Shard(0)])
    p = distribute_tensor(torch.rand(64, dtype=torch.float64) + 1, mesh, [Replicate()])
    with Ops() as mode:
        fs.binary_cross_entropy_with_logits(xs, zs, w, pos_weight=p).backward()
    return mode.seen, xs.to_local().numel()


def _errors(rank, world):
    """What unsupported layouts raise."""
    import fused_sigxent as fs
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (1, world))
    x, z = _full((4, 6))
    raised = {}
    cases = {
        "partial logits": lambda: fs.binary_cross_entropy_with_logits(
            DTensor.from_local(x, mesh, [Partial()]), DTensor.from_local(z, mesh, [Partial()])),
        "labels placed otherwise": lambda: fs.binary_cross_entropy_with_logits(
            distribute_tensor(x, mesh, [Shard(0)]), distribute_tensor(z, mesh, [Shard(1)])),
        "2-D mesh": lambda: fs.binary_cross_entropy_with_logits(
            distribute_tensor(x, mesh2, [Replicate(), Shard(0)]), distribute_tensor(z, mesh2, [Replicate(), Shard(0)])),
        "weight sharded on another dim": lambda: fs.binary_cross_entropy_with_logits(
            distribute_tensor(x, mesh, [Shard(0)]), distribute_tensor(z, mesh, [Shard(0)]),
            distribute_tensor(torch.rand(6, dtype=torch.float64), mesh, [Shard(0)])),
        "head weight replicated": lambda: fs.linear_sigmoid_cross_entropy(
            torch.randn(4, 3), distribute_tensor(torch.randn(6, 3), mesh, [Replicate()]), torch.tensor([0, 1, 2, 3])),
        "head dense target replicated": lambda: fs.linear_sigmoid_cross_entropy(
            torch.randn(4, 3), distribute_tensor(torch.randn(6, 3), mesh, [Shard(0)]),
            distribute_tensor(torch.rand(4, 6), mesh, [Replicate()])),
        "head bias plain": lambda: fs.linear_sigmoid_cross_entropy(
            torch.randn(4, 3), distribute_tensor(torch.randn(6, 3), mesh, [Shard(0)]), torch.tensor([0, 1, 2, 3]),
            torch.randn(6)),
        "head id out of range": lambda: fs.linear_sigmoid_cross_entropy(
            torch.randn(4, 3), distribute_tensor(torch.randn(6, 3), mesh, [Shard(0)]), torch.tensor([0, 1, 7, 3])),
    }
    for name, case in cases.items():
        try:
            case()
            raised[name] = None
        except (NotImplementedError, ValueError) as error:
            raised[name] = f"{type(error).__name__}: {error}"
    return raised


def _head_cases(rank, world):
    """The class-parallel head against the unsharded composition, float64."""
    import fused_sigxent as fs
    from conftest import oracle_elementwise
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(7)
    B, H, C = 7, 5, 11  # uneven over 2 and 3 ranks: rows and classes
    x = torch.randn(B, H, generator=g, dtype=torch.float64)
    w = torch.randn(C, H, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    p = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    ids = torch.tensor([[0, 10], [3, -1], [11, -1], [4, 4], [7, 2], [-1, -1], [9, 1]])
    dense = torch.zeros(B, C, dtype=torch.float64)
    for r, row in enumerate(ids.tolist()):
        for c in row:
            if 0 <= c < C:
                dense[r, c] = 1.0
    out = []
    for name, input_placement, target in [
        ("replicated trunk, positives", Replicate(), "ids"),
        ("data-parallel trunk, positives", Shard(0), "ids"),
        ("replicated trunk, dense Shard(1)", Replicate(), "dense"),
    ]:
        for reduction, smoothing, chunk in [("mean", 0.1, 3), ("sum", 0.0, None)]:
            xs = distribute_tensor(x, mesh, [input_placement]).requires_grad_()
            ws = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
            bs = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_()
            ps = distribute_tensor(p, mesh, [Shard(0)]).requires_grad_()
            t = (distribute_tensor(ids, mesh, [input_placement]) if target == "ids"
                 else distribute_tensor(dense, mesh, [Shard(1)]))
            loss = fs.linear_sigmoid_cross_entropy(xs, ws, t, bs, pos_weight=ps, label_smoothing=smoothing,
                                                   reduction=reduction, chunk_size=chunk)
            (loss * 1.5).backward()
            full = [v.clone().requires_grad_() for v in (x, w, b, p)]
            elementwise = oracle_elementwise(F.linear(full[0], full[1], full[2]), dense, full[3], smoothing)
            want = elementwise.mean() if reduction == "mean" else elementwise.sum()
            (want * 1.5).backward()
            out.append((f"{name} {reduction}", loss.full_tensor(), want.detach(),
                        [xs.grad.full_tensor(), ws.grad.full_tensor(), bs.grad.full_tensor(), ps.grad.full_tensor()],
                        [v.grad for v in full],
                        [tuple(v.grad.placements) == tuple(v.placements) for v in (xs, ws, bs, ps)]))
    return out


def _peak(step) -> int:
    """Resident bytes above the current at the peak of `step()` (after a warm call)."""
    return time_and_peak(step)[1]


def _memory(rank, world):
    """Per-rank peaks: a sharded loss against its gradient's bytes; the
    class-parallel head against the single-device fused call (rank 0). On
    the CPU path: sizes that mean something are minutes under the interpreter."""
    import os

    import fused_sigxent as fs
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ["FUSED_SIGXENT_BACKEND"] = "auto"
    mesh = init_device_mesh("cpu", (world,))
    x = distribute_tensor(torch.randn(512, 4096), mesh, [Shard(1)]).requires_grad_()
    z = distribute_tensor((torch.rand(512, 4096) > 0.5).float(), mesh, [Shard(1)])
    w = distribute_tensor(torch.rand(4096), mesh, [Shard(0)])

    def sharded_step():
        fs.binary_cross_entropy_with_logits(x, z, w).backward()
        x.grad = None

    sharded = _peak(sharded_step)
    gradient = x.to_local().numel() * 4
    B, H, C = 1024, 64, 8192
    xh = torch.randn(B, H, requires_grad=True)
    wh = torch.randn(C, H) * 0.1
    ids = torch.randint(0, C, (B, 4))
    ws = distribute_tensor(wh, mesh, [Shard(0)]).requires_grad_()
    xs = distribute_tensor(xh.detach(), mesh, [Replicate()]).requires_grad_()

    def head_step():
        fs.linear_sigmoid_cross_entropy(xs, ws, ids).backward()
        xs.grad = ws.grad = None

    head = _peak(head_step)
    dist.barrier()
    single = None
    if rank == 0:
        wl = wh.clone().requires_grad_()

        def single_step():
            fs.linear_sigmoid_cross_entropy(xh, wl, ids).backward()
            xh.grad = wl.grad = None

        single = _peak(single_step)
    return sharded, gradient, head, single


def _edges(rank, world):
    """Edge cases a user met: all-zero TF weights (the loss 0, the gradient 0,
    never NaN); a class-parallel rank holding no classes (C < W); out-of-range
    class ids in DTensor targets (the package's ValueError, on every rank);
    plain logits with DTensor labels (refused by name)."""
    import fused_sigxent as fs
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    x, z = _full((4, 3))
    xs = distribute_tensor(x, mesh, [Shard(0)]).requires_grad_()
    loss = fs.sigmoid_cross_entropy(distribute_tensor(z, mesh, [Shard(0)]), xs,
                                    distribute_tensor(torch.zeros(4, 3, dtype=torch.float64), mesh, [Shard(0)]),
                                    reduction=fs.Reduction.MEAN)
    loss.backward()
    out["zero weights"] = (loss.full_tensor().item(), xs.grad.full_tensor().abs().max().item())
    g = torch.Generator().manual_seed(3)
    xh, wh = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, -1, 1])  # C = 2 over 3 ranks: rank 2 has none
    got = fs.linear_sigmoid_cross_entropy(xh, distribute_tensor(wh, mesh, [Shard(0)]), ids).full_tensor()
    out["empty class block"] = (got.item(), fs.linear_sigmoid_cross_entropy(xh, wh, ids).item())
    raised = []
    for placement in (Replicate(), Shard(0)):
        try:
            fs.sigmoid_focal_loss(distribute_tensor(torch.randn(4, 6), mesh, [placement]),
                                  distribute_tensor(torch.tensor([0, 1, 9, 6]), mesh, [placement]), reduction="sum")
            raised.append(None)
        except ValueError as error:
            raised.append(str(error))
    out["bad ids"] = raised
    try:
        fs.binary_cross_entropy_with_logits(torch.randn(4, 3), distribute_tensor(torch.rand(4, 3), mesh, [Replicate()]))
        out["plain logits"] = None
    except NotImplementedError as error:
        out["plain logits"] = str(error)
    return out


def session(rank, world):
    import time

    out, seconds = {}, {}
    parts = [("losses", _sharded_losses), ("focal", _class_index_focal), ("head", _head_cases), ("edges", _edges)]
    if world == 2:
        parts += [("ops", _ops_on_shards), ("errors", _errors), ("memory", _memory), ("docs", _docs_examples)]
    for name, part in parts:
        start = time.perf_counter()
        out[name] = part(rank, world)
        seconds[name] = time.perf_counter() - start
    out["seconds"] = seconds
    return out


@pytest.fixture(scope="module")
def sessions():
    return {world: run_ranks(world, "test_sharded", "session", env=ENV) for world in (2, 3)}


F64 = dict(rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("world", [2, 3])
def test_every_layout_gives_the_unsharded_loss_and_gradients(sessions, world):
    for where, loss, want, grads, wants, placed in sessions[world][0]["losses"]:
        torch.testing.assert_close(loss, want, **F64, msg=lambda m: f"{where}: {m}")
        for got, expected, arg in zip(grads, wants, "xzwp"):
            assert (got is None) == (expected is None), f"{where} grad {arg}"
            if got is not None:
                torch.testing.assert_close(got, expected, **F64, msg=lambda m: f"{where} grad {arg}: {m}")
        assert placed, f"{where}: a reduced loss is replicated, 'none' keeps the logits' placements, grads theirs"


@pytest.mark.parametrize("world", [2, 3])
def test_class_index_targets_are_global_ids(sessions, world):
    for where, loss, want, grad, want_grad in sessions[world][0]["focal"]:
        torch.testing.assert_close(loss, want, **F64, msg=lambda m: f"{where}: {m}")
        torch.testing.assert_close(grad, want_grad, **F64, msg=lambda m: f"{where}: {m}")


def test_the_fused_op_runs_on_local_shards_and_nothing_elementwise_at_full_size(sessions):
    seen, shard = sessions[2][0]["ops"]
    assert ("fused_sigxent.sigmoid_ce_fwd.default", shard) in seen
    # Views, the fused ops and copies of their own outputs aside, no op
    # makes a tensor of the shard's size: no plain-op loss, no temporaries.
    allowed = ("fused_sigxent.", "aten.view", "aten._to_copy", "aten.detach", "aten.alias", "aten.t.",
               "aten.expand", "aten.slice", "aten.as_strided", "aten.clone", "aten.empty", "aten.copy_",
               "aten.new_empty", "aten.zeros_like", "aten.mul.Tensor")
    full_size = [name for name, numel in seen if numel == shard and not name.startswith(allowed)]
    assert not full_size, full_size
    multiplies = [name for name, numel in seen if numel == shard and name.startswith("aten.mul")]
    assert len(multiplies) <= 1, multiplies  # at most the incoming gradient's scaling of the local gradient


@pytest.mark.parametrize("world", [2, 3])
def test_the_class_parallel_head_gives_the_unsharded_loss_and_gradients(sessions, world):
    for where, loss, want, grads, wants, placed in (c for r in sessions[world] for c in r["head"]):
        torch.testing.assert_close(loss, want, **F64, msg=lambda m: f"{where}: {m}")
        for got, expected, arg in zip(grads, wants, ["input", "weight", "bias", "pos_weight"]):
            torch.testing.assert_close(got, expected, **F64, msg=lambda m: f"{where} grad {arg}: {m}")
        assert all(placed), f"{where}: every gradient placed as its input"


def test_unsupported_layouts_raise_naming_the_placement(sessions):
    raised = sessions[2][0]["errors"]
    for name, words in [("partial logits", "Partial"), ("labels placed otherwise", "labels placed"),
                        ("2-D mesh", "2-D device mesh"), ("weight sharded on another dim", "weight placed"),
                        ("head weight replicated", "weight placed"), ("head dense target replicated", "Shard(1)"),
                        ("head bias plain", "bias"), ("head id out of range", "outside [-1, 6]")]:
        assert raised[name] is not None and words in raised[name], (name, raised[name])


def test_per_rank_peak_memory(sessions):
    sharded, gradient, head, _ = sessions[2][0]["memory"]
    single = sessions[2][0]["memory"][3]
    assert sharded <= 1.25 * gradient, (sharded, gradient)
    for rank in sessions[2]:
        assert rank["memory"][2] <= 0.6 * single, (rank["memory"][2], single)


def _docs_examples(rank, world):
    """docs/distributed.md's two examples, as written there, with what one
    process computes on the full tensors."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    import fused_sigxent as fs

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    features, labels = torch.randn(8, 16), (torch.rand(8, 12) > 0.7).float()
    full = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 12))
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 12))
    model.load_state_dict(full.state_dict())

    # Tensor parallel: a column-parallel head, the loss on its class-sharded logits.
    parallelize_module(model, mesh, {"2": ColwiseParallel(use_local_output=False)})
    logits = model(features)  # a DTensor placed Shard(-1): each rank its classes
    loss = fs.binary_cross_entropy_with_logits(
        logits, distribute_tensor(labels, mesh, [Shard(-1)]),
        pos_weight=distribute_tensor(torch.full((12,), 2.0), mesh, [Shard(0)]))
    loss.backward()

    want = F.binary_cross_entropy_with_logits(full(features), labels, pos_weight=torch.full((12,), 2.0))
    want.backward()
    tensor_parallel = (loss.full_tensor(), model[2].weight.grad.full_tensor(), want.detach(), full[2].weight.grad)

    # Extreme multi-label: a data-parallel trunk, a class-parallel head, sparse positives.
    trunk = nn.Linear(16, 24)
    head = nn.Parameter(distribute_tensor(torch.randn(1000, 24) * 0.05, mesh, [Shard(0)]))  # rank r: its classes
    positives = torch.randint(0, 1000, (8, 5))  # global class ids, -1 pads
    positives[:, 4] = -1
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)  # this rank's share of the batch
    hidden = DTensor.from_local(trunk(features[rows]), mesh, [Shard(0)])
    loss = fs.linear_sigmoid_cross_entropy(hidden, head, DTensor.from_local(positives[rows], mesh, [Shard(0)]))
    loss.backward()  # head.grad: this rank's classes; trunk: this rank's rows, to be averaged by DDP

    whole = nn.Linear(16, 24)
    whole.load_state_dict(trunk.state_dict())
    head_full = head.full_tensor().detach().requires_grad_()
    want = fs.linear_sigmoid_cross_entropy(whole(features), head_full, positives)
    want.backward()
    extreme = (loss.full_tensor(), want.detach(), trunk.weight.grad, whole.weight.grad, head.grad.full_tensor(),
               head_full.grad)
    return tensor_parallel, extreme


def test_the_docs_examples_compute_what_one_process_does(sessions):
    ranks = [r["docs"] for r in sessions[2]]
    for (loss, grad, want, want_grad), _ in ranks:
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(grad, want_grad)
    # The data-parallel trunk's gradients add up, over the ranks, to one process's.
    for _, (loss, want, _, whole_grad, head_grad, want_head_grad) in ranks:
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(head_grad, want_head_grad)
        torch.testing.assert_close(sum(extreme[2] for _, extreme in ranks), whole_grad)


@pytest.mark.parametrize("world", [2, 3])
def test_edge_cases_users_met(sessions, world):
    for rank in sessions[world]:
        edges = rank["edges"]
        assert edges["zero weights"] == (0.0, 0.0)
        got, want = edges["empty class block"]
        assert got == pytest.approx(want, rel=1e-12)
        assert all(message is not None and "[-1, 6]" in message for message in edges["bad ids"]), edges["bad ids"]
        assert edges["plain logits"] is not None and "labels placed" in edges["plain logits"]
