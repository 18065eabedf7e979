"""Cross-compiles the kernels for sm_90 with no GPU and prints, as JSON, what
their PTX and ptxas say: access widths, fp64 use, local memory and spills.

Run in a process without TRITON_INTERPRET (tests/test_ptx.py does that).
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fused_sigxent.kernels.sigmoid_ce_bwd import _sigmoid_ce_bwd_kernel
from fused_sigxent.kernels.sigmoid_ce_fwd import _sigmoid_ce_fwd_kernel
from fused_sigxent.kernels.sigmoid_ce_scale import _sigmoid_ce_scale_kernel

TARGET = GPUTarget("cuda", 90, 32)
# A config from configs/: 2048 elements over 8 warps is 8 per thread, 16
# bytes of bfloat16 (one 16-byte access) or 32 bytes of float32 (two).
BLOCK, NUM_WARPS = 2048, 8


def jit_function(kernel):
    """The JITFunction under an autotune/heuristics wrapper."""
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


def compile_ptx(kernel, types: dict, constexprs: dict, target=TARGET) -> str:
    """PTX for `kernel` with the given argument types; every pointer is
    promised 16-byte aligned (as Triton specializes real aligned tensors)."""
    fn = jit_function(kernel)
    signature = {}
    for name in fn.arg_names:
        signature[name] = "constexpr" if name in constexprs else types.get(name, "i32")
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if signature[name].startswith("*")}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": NUM_WARPS}).asm["ptx"]


def spill_bytes(ptx: str) -> int:
    """Spill stores + loads that ptxas reports, from the ptxas Triton itself
    uses for the PTX's target (Triton ships it)."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = re.search(r"\.target\s+sm_(\d+)", ptx).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([get_ptxas(int(arch)).path, f"-arch=sm_{arch}a" if arch == "90" else f"-arch=sm_{arch}",
                          "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    assert out.returncode == 0, out.stderr
    report = out.stderr + out.stdout
    assert "spill" in report, report  # ptxas -v ran and reported
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))


def features(ptx: str) -> dict:
    return {
        "ld_v4": len(re.findall(r"ld\.global(?:\.[a-z0-9_:]+)*\.(?:v4\.b32|v2\.b64)", ptx)),
        "st_v4": len(re.findall(r"st\.global(?:\.[a-z0-9_:]+)*\.(?:v4\.b32|v2\.b64)", ptx)),
        "ld_scalar_b32": len(re.findall(r"ld\.global(?:\.[a-z]+)*\.b32\s", ptx)),
        "f64": len(re.findall(r"\.f64\b", ptx)),
        "local": len(re.findall(r"\.local\b", ptx)),
        "spill_bytes": spill_bytes(ptx),
    }


def fwd_variant(logits, labels, reduction, grads, has_weight, ct, int64=False, target=TARGET):
    types = {
        "logits_ptr": f"*{logits}", "labels_ptr": f"*{labels}", "weight_ptr": "*fp32", "pos_weight_ptr": "*fp32",
        "loss_ptr": f"*{logits}", "denom_ptr": f"*{ct}", "grad_logits_ptr": f"*{logits}",
        "grad_labels_ptr": f"*{labels}", "partials_ptr": f"*{ct}", "ticket_ptr": "*i32",
        "smoothing_ptr": f"*{ct}",
    }
    constexprs = dict(
        REDUCTION=reduction, HAS_WEIGHT=has_weight, SCALAR_WEIGHT=False, HAS_POS_WEIGHT=has_weight, NDIM=2,
        WRITE_GRAD_LOGITS=grads, WRITE_GRAD_LABELS=False, INT64=int64, MAX_PROGRAMS=2048,
        CT=tl.float64 if ct == "fp64" else tl.float32, BLOCK=BLOCK,
    )
    return features(compile_ptx(_sigmoid_ce_fwd_kernel, types, constexprs, target))


def bwd_variant(logits, labels, ct):
    types = {
        "grad_ptr": f"*{logits}", "logits_ptr": f"*{logits}", "labels_ptr": f"*{labels}", "weight_ptr": "*fp32",
        "pos_weight_ptr": "*fp32", "denom_ptr": f"*{ct}", "grad_logits_ptr": f"*{logits}",
        "grad_labels_ptr": f"*{labels}", "smoothing_ptr": f"*{ct}",
    }
    constexprs = dict(REDUCTION=3, HAS_WEIGHT=True, HAS_POS_WEIGHT=True, NDIM=2, NEED_GRAD_LOGITS=True,
                      NEED_GRAD_LABELS=False, INT64=False, CT=tl.float64 if ct == "fp64" else tl.float32, BLOCK=BLOCK)
    return features(compile_ptx(_sigmoid_ce_bwd_kernel, types, constexprs))


def scale_variant(dtype):
    types = {"grad_ptr": "*fp32", "grad_logits_ptr": f"*{dtype}", "grad_labels_ptr": f"*{dtype}"}
    constexprs = dict(HAS_GRAD_LOGITS=True, HAS_GRAD_LABELS=False, INT64=False, CT=tl.float32, BLOCK=BLOCK)
    return features(compile_ptx(_sigmoid_ce_scale_kernel, types, constexprs))


VARIANTS = {
    # name: what the training step of a CTR / multi-label model runs
    "fwd bf16/u8 mean + grad, class weights": lambda: fwd_variant("bf16", "u8", 5, True, True, "fp32"),
    "fwd bf16/bf16 none": lambda: fwd_variant("bf16", "bf16", 0, False, False, "fp32"),
    "fwd fp32/fp32 sum + grad": lambda: fwd_variant("fp32", "fp32", 1, True, False, "fp32"),
    "fwd bf16/u8 mean + grad, int64 offsets": lambda: fwd_variant("bf16", "u8", 5, True, True, "fp32", int64=True),
    # An A100 (sm_80) build of the same forward, for portability.
    "fwd bf16/u8 mean + grad, sm_80": lambda: fwd_variant("bf16", "u8", 5, True, True, "fp32",
                                                        target=GPUTarget("cuda", 80, 32)),
    "fwd fp64 mean": lambda: fwd_variant("fp64", "fp64", 5, True, True, "fp64"),
    "bwd bf16/u8": lambda: bwd_variant("bf16", "u8", "fp32"),
    "bwd fp32/fp32": lambda: bwd_variant("fp32", "fp32", "fp32"),
    "scale bf16": lambda: scale_variant("bf16"),
}

if __name__ == "__main__":
    names = sys.argv[1:] or list(VARIANTS)
    print(json.dumps({name: VARIANTS[name]() for name in names}))
