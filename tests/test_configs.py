"""configs/ and its loader (kernels/_configs.py): every kernel has candidates,
and the pruning picks them by numel class and element size."""

import json
from importlib import resources

import pytest

from fused_sigxent.kernels import _configs, _layout

KERNELS = ["sigmoid_ce_fwd", "sigmoid_ce_bwd", "sigmoid_ce_scale"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_has_valid_candidates(kernel):
    spec = json.loads(resources.files("fused_sigxent.configs").joinpath(f"{kernel}.json").read_text())
    assert spec["kernel"] == f"_{kernel}_kernel"
    blocks = [c["BLOCK"] for c in spec["candidates"]] + [spec["interpreter"]["BLOCK"]]
    for block in blocks:
        # Powers of two for tl.arange; one grid stride (8 programs per SM, up
        # to 148 SMs) within the headroom above _layout.INT32_LIMIT that keeps
        # int32 offsets safe.
        assert block & (block - 1) == 0
        assert block * 8 * 148 < 2**31 - _layout.INT32_LIMIT
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
