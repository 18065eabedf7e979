"""What the kernels compile to for an H100 (sm_90), checked here with no GPU:
16-byte accesses on the contiguous path, no local memory or spills, and no
float64 instructions outside the float64 path (tests/ptx_probe.py)."""

import json
import os
import subprocess
import sys

import pytest

PROBE = os.path.join(os.path.dirname(__file__), "ptx_probe.py")


@pytest.fixture(scope="module")
def ptx():
    # A fresh process: kernels compile only where TRITON_INTERPRET is unset.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, PROBE], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_kernel_has_vector_loads_and_stores(ptx):
    for name, f in ptx.items():
        assert f["ld_v4"] >= 1 and f["st_v4"] >= 1, (name, f)


def test_no_local_memory_or_spills(ptx):
    for name, f in ptx.items():
        assert f["local"] == 0 and f["spill_bytes"] == 0, (name, f)


def test_float64_only_in_the_float64_path(ptx):
    for name, f in ptx.items():
        if "fp64" in name:
            assert f["f64"] > 0, (name, f)
        else:
            assert f["f64"] == 0, (name, f)


def test_bf16_logits_move_16_bytes_per_access(ptx):
    # 2048 elements over 256 threads: 8 bf16 logits per thread, one 16-byte
    # load; the gradient written in the forward is one 16-byte store.
    f = ptx["fwd bf16/u8 mean + grad, class weights"]
    assert f["ld_v4"] == 1 and f["st_v4"] == 1
    f = ptx["fwd fp32/fp32 sum + grad"]
    assert f["ld_v4"] == 4 and f["st_v4"] == 2  # 8 floats of logits and labels: 2 + 2 loads
