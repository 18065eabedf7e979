"""The CPU loop (csrc/sigmoid_ce_cpu.cpp): the loss, its reduction and its
gradients in one vectorized, multithreaded pass, reading every dtype as it
is (bf16 logits, uint8/bool labels) with no temporaries.

It is compiled on first use by the machine's C++ compiler against
this torch's own headers and vector math (ATen's at::vec, for the CPU
capability ATen itself uses), cached per source, torch and flags under
$FUSED_SIGXENT_CACHE (default ~/.cache/fused_sigxent, or a temporary directory where that
cannot be written), and loaded with
ctypes. Where it cannot be built (no compiler), `library()` warns once and
returns None, and impl/cpu.py's ATen tiles run instead. It implements the
cross entropy only: the focal loss and class-index labels take the tiles.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import torch
from torch import Tensor

from ..core import layout  # the kernels' broadcast layout: one copy at most, the same collapse

SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "sigmoid_ce_cpu.cpp")
CACHE_ENV = "FUSED_SIGXENT_CACHE"
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3, torch.uint8: 4, torch.bool: 4}
# at::vec's instruction set: the one ATen dispatches to on this CPU.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512",
               "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}


class Args(ctypes.Structure):
    """The C++ `Args`, field for field (checked against its sizeof on load)."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("x", "z", "w", "p", "incoming", "loss", "gx", "gz")),
        *((name, ctypes.c_int64 * 4) for name in ("sizes", "w_strides", "p_strides")),
        ("n", ctypes.c_int64),
        ("smoothing", ctypes.c_double),
        ("scale", ctypes.c_double),
        *((name, ctypes.c_int32) for name in ("x_dtype", "z_dtype", "w_dtype", "p_dtype", "incoming_dtype",
                                               "loss_dtype", "want_loss")),
    ]


def _command(output: str) -> list[str]:
    torch_dir = os.path.dirname(torch.__file__)
    lib = os.path.join(torch_dir, "lib")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = _CAPABILITY_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])
    return [os.environ.get("CXX", "c++"), "-O3", "-std=c++17", "-fopenmp", "-shared", "-fPIC", "-fvisibility=hidden",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *flags, "-isystem", os.path.join(torch_dir, "include"),
            SOURCE, "-o", output, f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}"]


def _cache_dir() -> str:
    """$FUSED_SIGXENT_CACHE, else ~/.cache/fused_sigxent, else (a home that
    cannot be written, as on some CI runners) a per-user temporary directory."""
    if CACHE_ENV in os.environ:
        return os.environ[CACHE_ENV]
    home = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fused_sigxent")
    try:
        os.makedirs(home, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return os.path.join(tempfile.gettempdir(), f"fused_sigxent-{os.getuid()}")


def _build() -> str:
    """The compiled library's path, built if this source, torch and flag set
    has none yet (written under a temporary name, then renamed: concurrent
    first calls never load a half-written file)."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + repr((_command("out"), torch.__version__, sys.platform)).encode()).hexdigest()[:16]
    directory = _cache_dir()
    path = os.path.join(directory, f"sigmoid_ce_cpu-{key}.so")
    if not os.path.exists(path):
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        try:
            done = subprocess.run(_command(tmp), capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(done.stderr.strip()[-2000:])
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


@functools.cache
def library():
    """The loaded loop, or None (with one warning) where it cannot be built."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        warnings.warn("fused_sigxent: no C++ compiler (c++ or $CXX): the CPU path runs as ATen ops, "
                      "slower than its compiled loop", RuntimeWarning, stacklevel=2)
        return None
    try:
        lib = ctypes.CDLL(_build())
    except (OSError, RuntimeError) as error:
        warnings.warn(f"fused_sigxent: the CPU loop could not be built, so the CPU path runs as ATen ops: {error}",
                      RuntimeWarning, stacklevel=2)
        return None
    lib.fused_sigxent_cpu_loop.restype = ctypes.c_double
    lib.fused_sigxent_cpu_loop.argtypes = [ctypes.POINTER(Args)]
    lib.fused_sigxent_cpu_loop_args_size.restype = ctypes.c_int64
    if lib.fused_sigxent_cpu_loop_args_size() != ctypes.sizeof(Args):
        raise RuntimeError("fused_sigxent: the CPU loop's Args and cpu_loop.Args differ")
    return lib


def serves(logits: Tensor, labels: Tensor, gamma) -> bool:
    """Whether the loop computes this variant: the cross entropy (no focal
    factor) with elementwise labels (not class indices)."""
    return gamma is None and labels.dtype in DTYPE_CODES and logits.dtype in DTYPE_CODES


def run(lib, logits: Tensor, labels: Tensor, weight: Tensor | None, pos_weight: Tensor | None, smoothing: float,
        scale: float, incoming: Tensor | None, want_loss: bool, loss: Tensor | None, gx: Tensor | None,
        gz: Tensor | None) -> float:
    """`cpu._run` for a variant the loop `serves`, on `lib`: the outputs
    given (None: not asked) are written, and the sum of the weighted loss
    (accumulated in float64 per fixed tile, in order; 0 without
    `want_loss`) is returned."""
    x, z = layout.contiguous(logits), layout.contiguous(labels)
    sizes, (w, p), (w_strides, p_strides) = layout.collapse(x.shape, [weight, pos_weight])
    if incoming is not None:
        incoming = incoming.expand(x.shape).contiguous()
    a = Args(
        x=x.data_ptr(), z=z.data_ptr(), w=_pointer(w), p=_pointer(p), incoming=_pointer(incoming),
        loss=_pointer(loss), gx=_pointer(gx), gz=_pointer(gz),
        sizes=(ctypes.c_int64 * 4)(*sizes), w_strides=(ctypes.c_int64 * 4)(*w_strides),
        p_strides=(ctypes.c_int64 * 4)(*p_strides), n=x.numel(), smoothing=smoothing, scale=scale,
        x_dtype=DTYPE_CODES[x.dtype], z_dtype=DTYPE_CODES[z.dtype], w_dtype=_code(w), p_dtype=_code(p),
        incoming_dtype=_code(incoming), loss_dtype=_code(loss), want_loss=want_loss,
    )
    return lib.fused_sigxent_cpu_loop(ctypes.byref(a))


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _code(t: Tensor | None) -> int:
    return 0 if t is None else DTYPE_CODES[t.dtype]
