"""The compiled CPU loop (fused_sigxent/impl/csrc/sigmoid_ce_cpu.cpp): built here
(CI has a compiler), the kernels' formulas, across its chunks, the same sum
for any thread count, and the ATen tiles where it cannot be built.
tests/impl/test_cpu.py runs the CPU path's semantics through both."""

import os
import re
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

import fused_sigxent as fs
from conftest import assert_close, oracle_elementwise, oracle_reduce
from fused_sigxent.impl import cpu_loop as _cpu_loop


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "auto")


def test_log1p_polynomial_is_the_kernels():
    # One polynomial for log1p(e), e in [0, 1], in both implementations
    # (its error bound is tests/kernels/test_math.py's).
    from fused_sigxent.kernels import _math

    with open(_cpu_loop.SOURCE) as f:
        source = f.read()
    found = dict(re.findall(r"(LOG1P_P\d) = ([0-9.]+)f", source))
    assert len(found) == 5
    for name, value in found.items():
        assert float(value) == getattr(_math, name).value, name


def test_builds_here_once():
    lib = _cpu_loop.library()
    assert lib is not None
    # Cached per source, torch and flags: a second build finds the file.
    assert _cpu_loop._build() == lib._name


@pytest.mark.parametrize("dtype,label_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.uint8),
                                               (torch.float16, torch.bool), (torch.float64, torch.float64)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_across_chunks_against_float64(dtype, label_dtype, reduction):
    # 7 x 5003 = 35021 elements: two whole chunks of 16384 and a ragged third,
    # whose rows start mid-chunk; a per-class weight and a per-row pos_weight.
    x = (torch.randn(7, 5003) * 5).to(dtype).requires_grad_()
    z = (torch.rand(7, 5003) if label_dtype.is_floating_point else torch.rand(7, 5003) > 0.5).to(label_dtype)
    w = torch.rand(5003).to(dtype)
    p = (torch.rand(7, 1) * 3).to(dtype)
    loss = fs.binary_cross_entropy_with_logits(x, z, w, reduction, pos_weight=p, label_smoothing=0.1)
    grad = torch.randn(loss.shape, dtype=torch.float64)
    loss.backward(grad.to(loss.dtype))

    x64 = x.detach().double().requires_grad_()
    elementwise = oracle_elementwise(x64, z.double(), p.double(), 0.1)
    expected = oracle_reduce(elementwise, w, "torch_mean" if reduction == "mean" else reduction)
    expected.backward(grad)
    assert_close(loss, expected, dtype)
    assert_close(x.grad, x64.grad, dtype)


def test_the_sum_is_the_same_for_any_thread_count():
    # Partial sums per fixed chunk, added in chunk order.
    x, z = torch.randn(5, 20000), torch.rand(5, 20000)
    threads = torch.get_num_threads()
    try:
        sums = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            sums.append(fs.binary_cross_entropy_with_logits(x, z, reduction="sum"))
    finally:
        torch.set_num_threads(threads)
    assert sums[0].item() == sums[1].item() == sums[2].item()


@pytest.mark.parametrize("cxx,message", [("no-such-compiler", "no C++ compiler"), ("false", "could not be built")])
def test_without_a_build_the_tiles_run(cxx, message, tmp_path):
    script = textwrap.dedent("""
        import warnings
        import torch
        import fused_sigxent as fs
        torch.manual_seed(0)
        x, z, p = torch.randn(3, 1031), torch.rand(3, 1031), torch.rand(1031) * 3
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = [fs.binary_cross_entropy_with_logits(x, z, pos_weight=p).item() for _ in range(2)]
        print(len(caught), str(caught[0].message) if caught else "")
        print(repr(losses[0]))
    """)
    env = dict(os.environ, CXX=cxx, FUSED_SIGXENT_CACHE=str(tmp_path), FUSED_SIGXENT_BACKEND="auto")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("1 ") and message in lines[0], out.stdout  # warned once
    torch.manual_seed(0)
    x, z, p = torch.randn(3, 1031), torch.rand(3, 1031), torch.rand(1031) * 3
    expected = fs.binary_cross_entropy_with_logits(x, z, pos_weight=p)  # by the loop, here
    assert float(lines[1]) == pytest.approx(expected.item(), rel=1e-6)


def test_an_unwritable_cache_home_falls_back_to_a_temporary_directory(tmp_path, monkeypatch):
    # A cache home that is a file cannot hold the directory (even for root).
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.delenv(_cpu_loop.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert _cpu_loop._cache_dir() == os.path.join(tempfile.gettempdir(), f"fused_sigxent-{os.getuid()}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _cpu_loop._cache_dir() == str(tmp_path / "fused_sigxent")
