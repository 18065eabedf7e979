"""The persistent grid and the reduction workspace (kernels/_grid.py) and the
occupancy arithmetic behind them (kernels/_occupancy.py), on the CPU with
CUDA's answers stubbed."""

import pytest
import torch

from fused_sigxent.kernels import _grid, _occupancy

# An H100 SXM's SMs: 132 of them, 2048 threads, 64K registers, 228 KiB shared.
H100 = _occupancy.SM(count=132, max_threads=2048, registers=65536, shared_memory=228 * 1024)
CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def h100(monkeypatch):
    """CUDA device 0 answers as an H100; the cached slot count is recomputed
    before and after, so no other test sees this stand-in."""
    monkeypatch.setattr(_occupancy, "sm", lambda index: H100)
    _grid._partial_slots.cache_clear()
    yield
    _grid._partial_slots.cache_clear()


@pytest.mark.parametrize("n_regs, num_warps, shared, expected", [
    (0, 4, 0, 16),       # unknown registers: 2048 threads / 128
    (32, 4, 0, 16),      # 32 registers fill the file exactly at 2048 threads
    (40, 8, 0, 6),       # 40 x 32 = 1280 per warp: 51 warps, 6 programs of 8
    (128, 8, 0, 2),      # 4096 per warp: 16 warps
    (255, 8, 0, 1),      # 255 rounds up to 8192 per warp: 8 warps
    (255, 16, 0, 0),     # 16 warps of 8192 registers: more than the file
    (32, 4, 100 * 1024, 2),  # shared memory: 228 KiB / (100 KiB + 1 KiB reserved)
])
def test_programs_per_sm(n_regs, num_warps, shared, expected):
    assert _occupancy.programs_per_sm(H100, n_regs, num_warps, shared) == expected


def test_occupancy_is_the_fraction_of_thread_slots():
    assert _occupancy.occupancy(H100, 6, 8) == pytest.approx(6 * 256 / 2048)


def test_grid_from_occupancy(h100):
    grid = _grid.persistent_grid(1 << 30, CUDA0)
    assert grid.resolve(2048, per_sm=6) == (6 * 132,)
    # Unknown occupancy (a plain Triton launch of the grid): 8 per SM.
    assert grid({"BLOCK": 2048}) == (8 * 132,)
    # Fewer blocks than programs: one program per block; never zero programs.
    assert _grid.persistent_grid(5000, CUDA0).resolve(2048, per_sm=6) == (3,)
    assert _grid.persistent_grid(0, CUDA0).resolve(2048, per_sm=6) == (1,)
    # Every grid fits the slots of the reduction's partial sums.
    assert _grid.partial_slots(CUDA0) == 4096 >= grid.resolve(1024, per_sm=16)[0]


def test_grid_stride_stays_within_int32_headroom(h100):
    # A grid stride (programs x BLOCK) past the headroom above INT32_LIMIT
    # could overflow int32 offsets; the grid is capped instead.
    programs = _grid.persistent_grid(1 << 31, CUDA0).resolve(32768, per_sm=16)[0]
    assert programs * 32768 <= 2**31 - _grid.INT32_LIMIT


def test_interpreter_grid_is_unchanged():
    cpu = torch.device("cpu")
    assert _grid.max_programs(cpu) == 4 and _grid.partial_slots(cpu) == 4
    assert _grid.persistent_grid(1 << 20, cpu)({"BLOCK": 1024}) == (4,)


def test_no_workspace_is_allocated_during_a_capture(monkeypatch):
    # Memory allocated while capturing belongs to the graph's pool (and a
    # ticket zeroed there is not zeroed at replay): a capture may only reuse
    # the device's graph workspace, made by an eager call before.
    allocated = []
    monkeypatch.setattr(_grid, "_new_workspace", lambda device: allocated.append(device) or object())
    monkeypatch.setattr(_grid, "_WORKSPACES", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="once eagerly"):
        _grid.workspace(CUDA0)
    assert allocated == [] and _grid._WORKSPACES == {}
    partials = torch.empty(8, dtype=torch.float64)
    ready = (torch.zeros(1), partials, partials.view(torch.float32))
    _grid._WORKSPACES[(0, "graph")] = ready
    ticket, found = _grid.workspace(CUDA0)
    assert ticket is ready[0] and found is ready[1]
    assert _grid.workspace(CUDA0, torch.float32)[1] is ready[2]
    assert allocated == []


def test_cuda_workspaces_are_made_on_a_thread_of_their_own(monkeypatch):
    # torch.compile's CUDA graphs route every allocation of the calling
    # thread to a graph's pool during its warm-up call; a workspace made
    # there would stay alive in memory the graphs give to other tensors.
    import threading

    callers = []

    def allocate(device):
        callers.append((threading.get_ident(), device))
        return "workspace"

    monkeypatch.setattr(_grid, "_allocate_cuda_workspace", allocate)
    assert _grid._new_workspace(CUDA0) == "workspace"
    assert len(callers) == 1 and callers[0][0] != threading.get_ident() and callers[0][1] == CUDA0

    def fail(device):
        raise torch.OutOfMemoryError("no room")

    monkeypatch.setattr(_grid, "_allocate_cuda_workspace", fail)
    with pytest.raises(torch.OutOfMemoryError, match="no room"):
        _grid._new_workspace(CUDA0)
    cpu_workspace = _grid._new_workspace(torch.device("cpu"))  # the interpreter's: made right here
    assert cpu_workspace[0].tolist() == [0] and cpu_workspace[1].numel() == 3 * _grid.partial_slots(torch.device("cpu"))
    assert cpu_workspace[2].data_ptr() == cpu_workspace[1].data_ptr() and cpu_workspace[2].dtype == torch.float32
