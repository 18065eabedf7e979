"""CUDA-only checks (marked gpu; skipped cleanly without a GPU): large and
int64-indexed sizes, no host syncs, CUDA graphs, streams, determinism, memory."""

import math

import pytest
import torch

import fused_sigxent as fs
from fused_sigxent.core.backend import interpreting

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(interpreting(), reason="runs compiled kernels: TRITON_INTERPRET=0 (make test-gpu)"),
]


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "auto")


def _step(x, z, w):
    loss = fs.binary_cross_entropy_with_logits(x, z, w, pos_weight=w, label_smoothing=0.1)
    loss.backward()
    return loss


@pytest.mark.parametrize("numel", [1 << 20, (1 << 24) + 3, 1 << 28])
def test_large_sizes_against_float64(numel):
    # Up to 256M elements (bf16 logits, uint8 labels), ragged at 2**24 + 3.
    x = torch.randn(numel, device="cuda").to(torch.bfloat16).requires_grad_()
    z = torch.rand(numel, device="cuda") > 0.5
    loss = fs.binary_cross_entropy_with_logits(x, z.to(torch.uint8))
    ref = torch.nn.functional.binary_cross_entropy_with_logits(x.detach().double(), z.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-2, atol=1e-3)
    loss.backward()
    expected = (torch.sigmoid(x.detach().float()) - z.float()) / numel
    torch.testing.assert_close(x.grad.float(), expected, rtol=2e-2, atol=1e-12)


def test_no_host_sync_in_a_training_step():
    x = torch.randn(512, 1000, device="cuda", requires_grad=True)
    z, w = torch.rand(512, 1000, device="cuda"), torch.rand(1000, device="cuda")
    compiled = torch.compile(_step)
    steps = [lambda: _step(x, z, w),
             lambda: compiled(x, z, w),
             lambda: fs.sigmoid_cross_entropy(z, x, w[None], 0.1, fs.Reduction.MEAN).backward(),
             lambda: fs.sigmoid_cross_entropy(z, x, 2.0).backward(),
             lambda: fs.sigmoid_cross_entropy_with_logits(labels=z, logits=x).sum().backward(),
             lambda: fs.weighted_cross_entropy_with_logits(labels=z, logits=x, pos_weight=3.0).mean().backward()]
    for step in steps:  # warm-up: the autotuner times configs (and syncs) on first use
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in steps:
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_cuda_graph_replay_with_new_data():
    x = torch.randn(256, 1031, device="cuda", requires_grad=True)
    z = torch.rand(256, 1031, device="cuda")
    w = torch.rand(1031, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            x.grad = None
            _step(x, z, w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        static_loss = _step(x, z, w)
    for _ in range(3):
        with torch.no_grad():
            x.copy_(torch.randn_like(x))
            z.copy_(torch.rand_like(z))
        graph.replay()
        torch.cuda.synchronize()
        expected = torch.nn.functional.binary_cross_entropy_with_logits(
            x.detach(), z * 0.9 + 0.05, w, pos_weight=w)
        torch.testing.assert_close(static_loss, expected, rtol=1e-5, atol=1e-6)


def test_two_streams_at_once():
    tensors = [(torch.randn(4096, 1000, device="cuda"), torch.rand(4096, 1000, device="cuda")) for _ in range(2)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    results = [None, None]
    for _ in range(5):
        for i, (s, (x, z)) in enumerate(zip(streams, tensors)):
            with torch.cuda.stream(s):
                results[i] = fs.binary_cross_entropy_with_logits(x, z, reduction="sum")
        torch.cuda.synchronize()
        for (x, z), r in zip(tensors, results):
            ref = torch.nn.functional.binary_cross_entropy_with_logits(x, z, reduction="sum")
            torch.testing.assert_close(r, ref, rtol=1e-5, atol=1e-2)


def test_bitwise_deterministic_at_64m():
    x = torch.randn(1 << 26, device="cuda", requires_grad=True)
    z = torch.rand(1 << 26, device="cuda")
    w = torch.rand(1 << 26, device="cuda")
    first = None
    for _ in range(10):
        x.grad = None
        loss = fs.sigmoid_cross_entropy(z, x, w, 0.1, fs.Reduction.MEAN)
        loss.backward(torch.tensor(0.5, device="cuda"))
        run = (loss.detach().clone(), x.grad.clone())
        first = first or run
        assert torch.equal(run[0], first[0]) and torch.equal(run[1], first[1])


def test_numel_past_int32():
    numel = (1 << 31) + 17
    x = torch.zeros(numel, device="cuda", dtype=torch.bfloat16)
    z = torch.ones(numel, device="cuda", dtype=torch.uint8)
    # The loss comes back in bf16: ln 2 rounds to 0.69140625 there (bf16's
    # spacing near 0.69 is 2**-8), so the elements are that exactly and the
    # mean is within one spacing of ln 2.
    ln2 = torch.tensor(math.log(2), dtype=torch.bfloat16).item()
    loss = fs.binary_cross_entropy_with_logits(x, z, reduction="none")
    assert loss[-1].item() == ln2
    assert fs.binary_cross_entropy_with_logits(x, z).item() == pytest.approx(math.log(2), abs=2 ** -8)


def test_peak_memory_is_inputs_outputs_and_a_few_kb():
    n = 1 << 24
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    z = (torch.rand(n, device="cuda") > 0.5).to(torch.uint8)
    _step(x, z, None)
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _step(x, z, None)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= x.numel() * x.element_size() + 64 * 1024  # the gradient + a few KB


def test_one_kernel_each_way():
    x = torch.randn(4096, 1000, device="cuda", requires_grad=True)
    z = torch.rand(4096, 1000, device="cuda")
    _step(x, z, None)
    from torch.profiler import ProfilerActivity, profile

    x.grad = None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss = fs.binary_cross_entropy_with_logits(x, z)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert len(kernels) == 1 and "sigmoid_ce_fwd" in kernels[0], kernels
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss.backward(torch.tensor(2.0, device="cuda"))
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert sum("sigmoid_ce" in k for k in kernels) == 1, kernels


def test_torch_compile_with_cuda_graphs():
    # mode="reduce-overhead" replays CUDA graphs whose pool memory torch.compile
    # reuses: the reduction's workspace must not live there (kernels/_grid.py).
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 1000).cuda()

    def loss_fn(inputs, labels):
        return fs.binary_cross_entropy_with_logits(model(inputs), labels, label_smoothing=0.1)

    compiled = torch.compile(loss_fn, mode="reduce-overhead")
    for _ in range(6):
        inputs, labels = torch.randn(256, 64, device="cuda"), torch.rand(256, 1000, device="cuda")
        model.zero_grad()
        expected = loss_fn(inputs, labels)
        expected.backward()
        expected_grad = model.weight.grad.clone()
        model.zero_grad()
        torch.compiler.cudagraph_mark_step_begin()
        loss = compiled(inputs, labels)
        loss.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.weight.grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_workspace_is_not_made_in_a_pool_the_caller_allocates_to():
    # What torch.compile's CUDA graphs do on a graph's first call: the
    # thread's allocations go to the graph's pool, on a stream of their own.
    # The loss's temporaries are freed; nothing of ours may stay there.
    x, z = torch.randn(64, 33, device="cuda"), torch.rand(64, 33, device="cuda")
    pool, stream = torch.cuda.MemPool(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.use_mem_pool(pool), torch.no_grad():
        loss = fs.binary_cross_entropy_with_logits(x, z).cpu()
    torch.cuda.synchronize()
    live = [block for segment in pool.snapshot() for block in segment["blocks"]
            if block["state"] == "active_allocated"]
    assert live == []
    torch.testing.assert_close(loss, torch.nn.functional.binary_cross_entropy_with_logits(x, z).cpu())


def test_torch_compile_fullgraph_on_cuda():
    # No graph break anywhere on the CUDA route (torch 2.11's Dynamo broke the
    # graph on the capture check and the functorch depth), smoothing
    # values changing from call to call.
    torch.manual_seed(0)
    x = torch.randn(300, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    z = (torch.rand(300, 1000, device="cuda") < 0.3).to(torch.uint8)
    w, p = torch.rand(1000, device="cuda"), torch.rand(1000, device="cuda") * 3

    def loss_fn(x, z, s):
        return fs.binary_cross_entropy_with_logits(x, z, w, pos_weight=p, label_smoothing=s)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    for s in [0.1, 0.2, 0.0]:
        x.grad = None
        loss = compiled(x, z, s)
        loss.backward()
        got = (loss.detach().clone(), x.grad.clone())
        x.grad = None
        expected = loss_fn(x, z, s)
        expected.backward()
        torch.testing.assert_close(got[0], expected.detach())
        torch.testing.assert_close(got[1], x.grad)
    explained = torch._dynamo.explain(loss_fn)(x, z, 0.3)
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_second_device_while_the_first_is_current():
    # Triton launches on the current device: the op must switch to the
    # tensors' device (cuda:1 here, with cuda:0 current) for every launch.
    torch.cuda.set_device(0)
    x = torch.randn(1000, 37, device="cuda:1", requires_grad=True)
    z = torch.rand(1000, 37, device="cuda:1")
    w = torch.rand(37, device="cuda:1")
    for reduction in ["mean", "none"]:
        loss = fs.binary_cross_entropy_with_logits(x, z, w, reduction=reduction, pos_weight=w)
        loss.sum().backward(torch.tensor(1.5, device="cuda:1")) if reduction == "none" else loss.backward(
            torch.tensor(1.5, device="cuda:1"))
        ref_x = x.detach().double().requires_grad_()
        ref = torch.nn.functional.binary_cross_entropy_with_logits(
            ref_x, z.double(), w.double(), reduction=reduction, pos_weight=w.double())
        (ref.sum() if reduction == "none" else ref).backward(torch.tensor(1.5, device="cuda:1", dtype=torch.float64))
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-5, atol=1e-7)
        x.grad = None


def test_nothing_is_allocated_or_tuned_inside_a_capture(monkeypatch):
    # A capture may not allocate the reduction's workspace (graph-pool memory
    # that torch.compile reuses) or tune a kernel (compiles and timing runs):
    # either asks for an eager call first, which then makes capture work.
    from fused_sigxent.kernels import _grid, _launch
    from fused_sigxent.kernels.sigmoid_ce_fwd import _sigmoid_ce_fwd_kernel

    x, z = torch.randn(64, 33, device="cuda"), torch.rand(64, 33, device="cuda")
    for forget in ["workspace", "config"]:
        with torch.no_grad():
            fs.binary_cross_entropy_with_logits(x, z)
        torch.cuda.synchronize()
        # The launch plans go too: they hold the config a capture would launch.
        _launch.PLANS.clear()
        if forget == "workspace":
            monkeypatch.setattr(_grid, "_WORKSPACES", {})
        else:
            monkeypatch.setattr(_sigmoid_ce_fwd_kernel, "cache", {})
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="once eagerly"), torch.no_grad(), torch.cuda.graph(graph):
            fs.binary_cross_entropy_with_logits(x, z)
        with torch.no_grad():
            fs.binary_cross_entropy_with_logits(x, z)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            loss = fs.binary_cross_entropy_with_logits(x, z)
        graph.replay()
        torch.testing.assert_close(loss, torch.nn.functional.binary_cross_entropy_with_logits(x, z))


def test_grid_follows_the_compiled_kernels_occupancy():
    from fused_sigxent.kernels import _grid, _occupancy
    from fused_sigxent.kernels.sigmoid_ce_fwd import _sigmoid_ce_fwd_kernel

    x = torch.randn(1 << 24, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    z = (torch.rand(1 << 24, device="cuda") > 0.5).to(torch.uint8)
    _step(x, z, None)
    sm = _occupancy.sm(torch.cuda.current_device())
    for choice in _sigmoid_ce_fwd_kernel.cache.values():
        # Every kept config fits at least one program per SM and no grid
        # outgrows the partial sums' slots.
        assert choice.per_sm >= 1 and choice.spills == 0
        assert choice.per_sm * sm.count <= _grid.partial_slots(x.device)


def test_in_place_scale_is_never_timed(monkeypatch):
    # The scale kernel writes its inputs: timed like a tuned kernel, it would
    # scale the gradient once per timing run. Its config is fixed instead.
    from fused_sigxent.kernels.sigmoid_ce_scale import _sigmoid_ce_scale_kernel

    monkeypatch.setattr(_sigmoid_ce_scale_kernel, "cache", {})
    x = torch.randn(3000, 7, device="cuda", requires_grad=True)
    z = torch.rand(3000, 7, device="cuda")
    fs.binary_cross_entropy_with_logits(x, z).backward(torch.tensor(3.0, device="cuda"))
    expected = 3.0 * (torch.sigmoid(x.detach()) - z) / x.numel()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-9)


def test_linear_engine_first_call_tunes_without_corrupting_its_logits(monkeypatch):
    # The engine's loss writes its gradient over the logits chunk; the first
    # launch of a variant times candidates by launching them again and again,
    # which must not feed one run's gradient to the next as logits.
    from fused_sigxent.kernels.sigmoid_ce_fwd import _sigmoid_ce_fwd_kernel

    monkeypatch.setattr(_sigmoid_ce_fwd_kernel, "cache", {})
    x = torch.randn(300, 64, device="cuda").requires_grad_()
    w = (torch.randn(5000, 64, device="cuda") / 8).requires_grad_()
    z = (torch.rand(300, 5000, device="cuda") < 0.1).to(torch.uint8)
    loss = fs.linear_sigmoid_cross_entropy(x, w, z, chunk_size=128)
    loss.backward()
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(xd @ wd.T, z.double())
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-4, atol=1e-7)
