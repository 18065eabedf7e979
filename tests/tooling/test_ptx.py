"""What the kernels compile to for an H100 (sm_90), checked here with no GPU:
16-byte accesses on the contiguous path, no float64 instructions outside the
float64 path, and builds for int64 offsets and an A100 (tests/tooling/ptx_probe.py)."""

from ptx_probe import Variant, rows, rows_of


def _at(variant: Variant, block: int, warps: int) -> dict:
    (row,) = [r for r in rows_of(variant) if r["BLOCK"] == block and r["num_warps"] == warps]
    return row


def test_every_kernel_has_vector_loads_and_stores():
    for r in rows():
        assert r["loop_ldg128"] >= 1 and r["loop_stg128"] >= 1, r


def test_bf16_logits_move_16_bytes_per_access():
    # 2048 elements over 256 threads: 8 bf16 logits per thread, one 16-byte
    # load; the gradient written in the forward is one 16-byte store.
    r = _at(Variant("fwd", "bf16", "u8"), 2048, 8)
    assert r["loop_ldg128"] == 1 and r["loop_stg128"] == 1
    # 8 floats of logits and of labels: 2 + 2 loads, 2 stores of the gradient.
    r = _at(Variant("fwd", "fp32", "fp32"), 2048, 8)
    assert r["loop_ldg128"] == 4 and r["loop_stg128"] == 2
    # the elementwise loss out, bf16: one 16-byte store.
    r = _at(Variant("fwd", "bf16", "bf16", reduction="none", grads=""), 2048, 8)
    assert r["loop_ldg128"] == 2 and r["loop_stg128"] == 1


def test_float64_only_in_the_float64_path():
    for r in rows():
        assert (r["ptx_f64"] > 0) == (r["logits"] == "fp64"), r


def test_int64_offsets_and_an_a100_build_keep_their_vectors():
    for variant in (Variant("fwd", "bf16", "u8", int64=True), Variant("fwd", "bf16", "u8", arch=80)):
        r = _at(variant, 2048, 8)
        assert r["loop_ldg128"] == 1 and r["loop_stg128"] == 1, r
