"""configs/ and its loader (kernels/_configs.py): every kernel has candidates,
and the pruning picks them by numel class and element size; the first-launch
tuner (kernels/_tuner.py) against a stand-in kernel, with CUDA's answers stubbed."""

import json
import threading
import time
import types
from importlib import resources

import pytest
import torch

from fused_sigxent.kernels import _configs, _grid, _occupancy, _tuner

KERNELS = ["sigmoid_ce_fwd", "sigmoid_ce_bwd", "sigmoid_ce_scale"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_has_valid_candidates(kernel):
    spec = json.loads(resources.files("fused_sigxent.configs").joinpath(f"{kernel}.json").read_text())
    assert spec["kernel"] == f"_{kernel}_kernel"
    blocks = [c["BLOCK"] for c in spec["candidates"]] + [spec["interpreter"]["BLOCK"]]
    for block in blocks:
        # Powers of two for tl.arange; one grid stride (at most 16 programs
        # per SM, up to 148 SMs) within the headroom above
        # _grid.INT32_LIMIT that keeps int32 offsets safe.
        assert block & (block - 1) == 0
        assert block * _occupancy.MAX_BLOCKS_PER_SM * 148 < 2**31 - _grid.INT32_LIMIT
    # The fewest warps bounds the programs per SM, so the partial sums' slots.
    assert all(c["num_warps"] >= _grid.MIN_WARPS for c in spec["candidates"])
    for size_class in range(len(spec["numel_class_bounds"]) + 1):
        for elem_bytes in [2, 4, 8]:
            assert _configs.candidates(kernel, size_class, elem_bytes)


def test_pruning_by_class_and_element_size():
    small_bf16 = _configs.candidates("sigmoid_ce_fwd", 0, 2)
    large_bf16 = _configs.candidates("sigmoid_ce_fwd", 1, 2)
    large_fp64 = _configs.candidates("sigmoid_ce_fwd", 1, 8)
    assert all(c["BLOCK"] <= 2048 for c in small_bf16)
    assert any(c["BLOCK"] == 8192 and c["num_warps"] == 8 for c in large_bf16)
    assert not any(c["BLOCK"] == 8192 for c in large_fp64)
    assert _configs.numel_class("sigmoid_ce_fwd", (1 << 20) - 1) == 0
    assert _configs.numel_class("sigmoid_ce_fwd", 1 << 20) == 1


def test_missing_file_falls_back():
    assert _configs.load("no_such_kernel") is _configs.FALLBACK
    assert _configs.candidates("no_such_kernel", 0, 2) == _configs.FALLBACK["candidates"]


def test_files_are_read_once(monkeypatch):
    # numel_class runs on every launch: parsing JSON there cost ~20% of the
    # host time of a call.
    _configs.load("sigmoid_ce_fwd")
    monkeypatch.setattr(_configs.resources, "files", lambda *a: pytest.fail("configs/ read again"))
    assert _configs.numel_class("sigmoid_ce_fwd", 5) == 0
    assert _configs.load("sigmoid_ce_bwd") is _configs.load("sigmoid_ce_bwd")


def test_launch_options_ask_for_fp_fusion_in_a_form_triton_accepts():
    # Triton 3.9 warns that FP fusion defaults off in 3.10; the option must
    # reach the backend's options (a launch keyword in Triton 3.6 and 3.9).
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    options = _configs.launch_options({"BLOCK": 2048, "num_warps": 8})
    assert options == {"BLOCK": 2048, "num_warps": 8, "num_stages": 1, "enable_fp_fusion": True}
    parsed = make_backend(GPUTarget("cuda", 90, 32)).parse_options(options)
    assert parsed.enable_fp_fusion is True and parsed.num_warps == 8


H100 = _occupancy.SM(count=132, max_threads=2048, registers=65536, shared_memory=228 * 1024)
# Registers per candidate BLOCK of the stand-in kernel: 8192 too many for
# half occupancy at 8 warps (3 programs of 8 warps = 37.5%), 4096 spills.
REGISTERS = {1024: 32, 2048: 40, 4096: 64, 8192: 80}
SPILLS = {4096: 24}


class StandInKernel:
    """A JITFunction's interface without Triton: compiles return the
    registers above; launches are recorded."""

    def __init__(self):
        params = ["x_ptr", "out_ptr", "n_elements", "numel_class", "HAS_WEIGHT", "REDUCTION", "BLOCK"]
        self.arg_names = params
        self.params = [types.SimpleNamespace(name=n, is_constexpr=n.isupper()) for n in params]
        self.compiled, self.launched = [], []

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            self.compiled.append(kwargs["BLOCK"])
            meta = types.SimpleNamespace(num_warps=kwargs["num_warps"], shared=0, warp_size=32)
            return types.SimpleNamespace(n_regs=REGISTERS[kwargs["BLOCK"]], n_spills=SPILLS.get(kwargs["BLOCK"], 0),
                                         metadata=meta, _init_handles=lambda: None)
        self.launched.append((grid, kwargs))


class CudaTensor:
    """What the tuner reads of a CUDA tensor."""

    def __init__(self, dtype=torch.bfloat16):
        self.device, self.dtype = torch.device("cuda", 0), dtype

    def element_size(self):
        return torch.empty((), dtype=self.dtype).element_size()


CANDIDATES = [{"BLOCK": b, "num_warps": 8} for b in (1024, 2048, 4096, 8192)]


@pytest.fixture
def tuner(monkeypatch):
    # cuda:0 answers as an H100; the cached slot count is recomputed before
    # and after, so no other test sees this stand-in.
    monkeypatch.setattr(_occupancy, "sm", lambda index: H100)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    _grid._partial_slots.cache_clear()
    timed = []
    # The stand-in's time: each timing faster than the one before.
    monkeypatch.setattr(_tuner, "time_ms", lambda call: timed.append(call) or 1.0 / len(timed))
    fn = StandInKernel()
    tuned = _tuner.Tuned(fn, lambda size_class, elem_bytes: [_configs.launch_options(c) for c in CANDIDATES],
                         dtype_arg="x_ptr")
    yield tuned, fn, timed
    _grid._partial_slots.cache_clear()


def launch(tuned, n=1 << 22, **flags):
    flags = {"HAS_WEIGHT": False, "REDUCTION": 1, **flags}
    tuned[_grid.persistent_grid(n, torch.device("cuda", 0))](CudaTensor(), CudaTensor(), n, 1, **flags)


def test_tuner_drops_spilling_and_low_occupancy_candidates(tuner):
    tuned, fn, timed = tuner
    launch(tuned)
    assert fn.compiled == [1024, 2048, 4096, 8192]
    # 4096 spills, 8192 fits 3 programs of 8 warps (37.5%): only 1024 and
    # 2048 are timed, and the faster (timed second) wins.
    assert len(timed) == 2
    grid, options = fn.launched[-1]
    assert options["BLOCK"] == 2048 and options["enable_fp_fusion"] is True
    # 40 registers x 8 warps: 6 programs per SM on 132 SMs.
    assert grid == (6 * 132,)


def test_tuner_keys_on_variant_flags_and_dtypes(tuner):
    tuned, fn, _ = tuner
    launch(tuned)
    launch(tuned, n=(1 << 22) + 5)  # same numel class: no new tuning
    assert len(tuned.cache) == 1 and len(fn.compiled) == 4
    launch(tuned, HAS_WEIGHT=True)  # a weighted variant is tuned for itself
    launch(tuned, REDUCTION=0)
    assert len(tuned.cache) == 3 and len(fn.compiled) == 12
    n = 1 << 22
    tuned[_grid.persistent_grid(n, torch.device("cuda", 0))](
        CudaTensor(torch.float32), CudaTensor(torch.float32), n, 1, HAS_WEIGHT=False, REDUCTION=1)
    assert len(tuned.cache) == 4


def test_tuner_refuses_to_tune_inside_a_capture(tuner, monkeypatch):
    tuned, fn, _ = tuner
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="once eagerly"):
        launch(tuned)
    assert fn.compiled == [] and fn.launched == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    launch(tuned)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    launch(tuned)  # tuned before the capture: the capture only launches
    assert len(fn.launched) == 2


def test_first_launches_tune_once_across_threads(tuner, monkeypatch):
    tuned, fn, timed = tuner
    slow = _tuner.time_ms
    monkeypatch.setattr(_tuner, "time_ms", lambda call: time.sleep(0.05) or slow(call))
    start, errors = threading.Barrier(4), []

    def first_launch():
        start.wait()
        try:
            launch(tuned)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=first_launch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(fn.compiled) == 4 and len(timed) == 2 and len(fn.launched) == 4


def test_an_untimed_kernel_takes_its_first_fitting_candidate(tuner):
    _, fn, timed = tuner
    fixed = _tuner.Tuned(fn, lambda size_class, elem_bytes: [_configs.launch_options(c) for c in CANDIDATES],
                         timed=False, dtype_arg="x_ptr")
    launch(fixed)
    assert timed == [] and fn.launched[-1][1]["BLOCK"] == 1024


class InPlaceKernel(StandInKernel):
    """A launch writes out = 2 x + 1, where out may be x itself (an output
    written over its input): applied twice, the result is wrong."""

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return super().run(*args, grid=grid, warmup=warmup, **kwargs)
        x, out = args[0], args[1]
        out.copy_(x * 2 + 1)
        self.launched.append((grid, kwargs))


def test_timing_keeps_an_input_its_output_is_written_over(tuner, monkeypatch):
    # Tuning times each candidate by launching it again and again on the
    # call's own tensors; an output aliasing an input (the linear engine's
    # gradient over its logits) would feed each launch the last one's result.
    monkeypatch.setattr(_tuner, "time_ms", lambda call: [call() for _ in range(3)] and 1.0)
    fn = InPlaceKernel()
    tuned = _tuner.Tuned(fn, lambda size_class, elem_bytes: [_configs.launch_options(c) for c in CANDIDATES],
                         dtype_arg="x_ptr", overwrites={"out_ptr": "x_ptr"})
    for flag in (False, True):
        x = torch.arange(6, dtype=torch.float32)
        tuned[(1,)](x, x, 6, 1, HAS_WEIGHT=flag, REDUCTION=1)
        assert len(fn.launched) > 1  # timed, then launched
        assert torch.equal(x, torch.arange(6, dtype=torch.float32) * 2 + 1), x
        fn.launched.clear()
    # a separate output: nothing to save
    x, out = torch.arange(6, dtype=torch.float32), torch.zeros(6)
    tuned[(1,)](x, out, 6, 1, HAS_WEIGHT=False, REDUCTION=0)
    assert torch.equal(out, x * 2 + 1) and torch.equal(x, torch.arange(6, dtype=torch.float32))


def test_the_scale_kernel_has_one_fixed_config_per_class():
    spec = _configs.load("sigmoid_ce_scale")
    assert "restore_value" not in spec
    for size_class in range(len(spec["numel_class_bounds"]) + 1):
        assert len(_configs.candidates("sigmoid_ce_scale", size_class, 2)) == 1


def test_an_overwritten_input_is_restored_when_timing_fails(tuner, monkeypatch):
    # do_bench can run out of memory (its cache flush): the caller's input is
    # still given back as it was.
    calls = []

    def failing(call):
        calls.append(call())
        if len(calls) == 2:
            raise torch.OutOfMemoryError("out of memory")
        return 1.0

    monkeypatch.setattr(_tuner, "time_ms", failing)
    fn = InPlaceKernel()
    tuned = _tuner.Tuned(fn, lambda size_class, elem_bytes: [_configs.launch_options(c) for c in CANDIDATES],
                         dtype_arg="x_ptr", overwrites={"out_ptr": "x_ptr"})
    x = torch.arange(6, dtype=torch.float32)
    with pytest.raises(torch.OutOfMemoryError):
        tuned[(1,)](x, x, 6, 1, HAS_WEIGHT=False, REDUCTION=1)
    assert torch.equal(x, torch.arange(6, dtype=torch.float32))
