"""Static analysis of the kernels' sm_90 code with no GPU: each variant is
launched through its real launcher (the kernel swapped for a recorder, so the
arguments are the launcher's own), specialized by Triton's own binder,
cross-compiled, and its cubin disassembled with the nvdisasm Triton ships.

Run in a process without TRITON_INTERPRET (the interpreter replaces the
kernels); `python -m perf.sass` and tests/ptx_probe.py see to that.
"""

import dataclasses
import importlib
import os
import re
import subprocess

import torch

# The instruction budget's arithmetic, for an H100 SXM: 132 SMs x 4 schedulers x
# 1.755 GHz (boost) x 32 lanes of thread-instructions per second, and ~3.0 TB/s
# of device-to-device copy bandwidth (bytes read plus written).
ISSUE_RATE = 132 * 4 * 1.755e9 * 32
COPY_BW = 3.0e12

# (rows, classes) of every captured launch: 1000 classes, as ImageNet or a
# multi-label head; not a multiple of 16, so no size is specialized as
# divisible (the common case for class counts), while 64 rows are.
SHAPE = (64, 1000)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64,
          "u8": torch.uint8, "index": torch.int64}
# Kernel module (and configs/ file) of each kernel.
CONFIG_NAMES = {"fwd": "sigmoid_ce_fwd", "bwd": "sigmoid_ce_bwd", "scale": "sigmoid_ce_scale"}
# Partial-sum slots on an H100 (kernels/_grid.py partial_slots): 132 SMs x
# 16 resident programs of 4 warps, rounded up to a power of two.
H100_PARTIAL_SLOTS = 4096
# Reduction names of the sweep -> the op's codes (fused_sigxent/core/reduction.py).
REDUCTIONS = {"none": 0, "sum": 1, "tf_mean": 2, "numel": 3, "nonzero": 4, "mean": 5}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kernel specialization the public API can launch.

    kernel: "fwd", "bwd" or "scale". logits, labels: dtype names of DTYPES.
    weight: None, "scalar" (one element), "class" ((1, C), per class),
      "sample" ((B, 1), per row) or "full" ((B, C)); pos_weight likewise.
    reduction: a key of REDUCTIONS. grads: the gradients written ("logits",
      "labels", "both" or "" for none): in the forward (gradient in the
      forward), recomputed by the backward, or scaled by the scale kernel.
    int64: offsets in int64 (numel past kernels/_grid.py INT32_LIMIT).
    arch: the compute capability compiled for. classes: the logits' last
    dimension (SHAPE's unless a variant needs another).
    focal: "" (sigmoid cross entropy) or the focal loss (docs/semantics.md) with
      alpha_t: "hard" (unsmoothed hard labels: u8, or "index" labels, int64
      class indices), "soft" (any other labels).
    """

    kernel: str
    logits: str = "bf16"
    labels: str = "u8"
    weight: str | None = None
    pos_weight: str | None = None
    reduction: str = "mean"
    grads: str = "logits"
    int64: bool = False
    arch: int = 90
    classes: int = SHAPE[1]
    focal: str = ""

    @property
    def name(self) -> str:
        parts = [self.kernel, f"{self.logits}/{self.labels}"]
        if self.kernel != "scale":
            parts.append(self.reduction)
        if self.grads:
            parts.append(f"d{self.grads}")
        if self.weight:
            parts.append(f"w={self.weight}")
        if self.pos_weight:
            parts.append(f"pw={self.pos_weight}")
        if self.classes != SHAPE[1]:
            parts.append(f"C={self.classes}")
        if self.focal:
            parts.append(f"focal={self.focal}")
        if self.int64:
            parts.append("int64")
        if self.arch != 90:
            parts.append(f"sm_{self.arch}")
        return " ".join(parts)

    def bytes_per_element(self) -> float:
        """Fewest bytes per element the launch must move: every full-size
        input read once and output written once (broadcast coefficients,
        re-read from cache, count as nothing)."""
        ex, ez = DTYPES[self.logits].itemsize, DTYPES[self.labels].itemsize
        if self.labels == "index":
            ez = 0  # one int64 per row, re-read from cache
        dx, dz = self.grads in ("logits", "both"), self.grads in ("labels", "both")
        if self.kernel == "scale":
            return 2 * (ex * dx + ez * dz)
        total = ex + ez + 4 * (self.weight == "full") + 4 * (self.pos_weight == "full")
        if self.reduction == "none":
            total += ex  # the elementwise loss (fwd) or incoming gradient (bwd)
        return total + ex * dx + ez * dz


def budget(v: Variant) -> float | None:
    """The budget of hot-loop SASS instructions per element, for the
    variants it names (every candidate must meet it): the forward writing
    the gradient with no weight, 40; the backward recomputing it, 30; the
    forward with per-class weight and pos_weight (and smoothing, which is
    data), 55. On sm_90 only; float64 (exact, for reference) has none."""
    if v.logits == "fp64" or v.kernel == "scale" or v.arch != 90:
        return None
    if v.focal:
        # The focal loss: the plain forward's budget plus ~15 for the focal factor
        # (with alpha_t), for hard labels (u8) and class indices (stepped per
        # chunk like a per-class weight: no division), whose factor needs one
        # exp. The backward gets the forward's too: the focal gradient needs
        # the loss itself (ce dF/dx), so it recomputes the log1p the plain
        # backward skips. Soft labels need a log too (two SFU instructions
        # more, the fewest: _math.focal_soft_labels), the selects of the
        # lanes where y = 1 and the floor that keeps lg2.approx.ftz off a
        # subnormal 1 - p_t; they measure 54.6-58.4 on sm_90 with Triton 3.9
        # and up to 59.1 with 3.6 (its ptxas), four over the focal budget of 55. Their
        # budget is the most that still keeps pace with copy bandwidth at
        # bf16 logits, labels and gradient (6 bytes per element): recorded,
        # not the goal met.
        if v.weight or v.pos_weight or not v.grads:
            return None
        return 6 * ISSUE_RATE / COPY_BW if v.focal == "soft" else 40.0 + 15.0
    if v.kernel == "fwd" and v.grads and not v.weight and not v.pos_weight:
        return 40.0
    if v.kernel == "bwd" and not v.weight and not v.pos_weight:
        return 30.0
    if v.kernel == "fwd" and v.weight == "class" and v.pos_weight == "class":
        return 55.0
    return None


def _coefficient(kind: str | None, shape: tuple[int, int]) -> torch.Tensor | None:
    rows, cols = shape
    sizes = {None: None, "scalar": (), "class": (cols,), "sample": (rows, 1), "full": shape}[kind]
    return None if sizes is None else torch.rand(sizes)


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def launch_args(v: Variant) -> tuple[object, tuple, dict]:
    """(kernel, args, kwargs) that the launcher passes for variant `v`,
    captured from a call on CPU tensors of SHAPE (with an H100's number of
    partial-sum slots, not the interpreter's)."""
    from fused_sigxent.kernels import _grid, _launch

    shape = (SHAPE[0], v.classes)
    x = torch.randn(shape).to(DTYPES[v.logits])
    if v.labels == "index":
        z = torch.randint(0, shape[1] + 1, shape[:1])
    else:
        z = torch.rand(shape).to(DTYPES[v.labels])
    ct = torch.float64 if v.logits == "fp64" else torch.float32
    smoothing = torch.zeros((), dtype=ct)
    focal = ()
    if v.focal:
        focal = (torch.full((), 2.0, dtype=ct), torch.full((), 0.25, dtype=ct), v.focal == "hard")
    w, pw = _coefficient(v.weight, shape), _coefficient(v.pos_weight, shape)
    dx, dz = v.grads in ("logits", "both"), v.grads in ("labels", "both")
    code = REDUCTIONS[v.reduction]
    name = CONFIG_NAMES[v.kernel]
    module = importlib.import_module(f"fused_sigxent.kernels.{name}")
    kernel_attr = f"_{name}_kernel"
    kernel, recorder = getattr(module, kernel_attr), _Recorder()
    limit = _grid.INT32_LIMIT
    setattr(module, kernel_attr, recorder)
    # A launch plan holds the kernel (here the recorder) and the int64 choice
    # it was made with: this capture makes its own, and leaves none behind.
    _launch.PLANS.clear()
    try:
        if v.int64:
            _grid.INT32_LIMIT = 0
        if v.kernel == "fwd":
            module.sigmoid_ce_fwd(x, z, w, pw, smoothing, code, x.dtype, dx, dz, *focal)
        elif v.kernel == "bwd":
            grad = torch.randn(shape if code == 0 else ()).to(x.dtype)
            module.sigmoid_ce_bwd(grad, x, z, w, pw, torch.ones((), dtype=ct), smoothing, code, dx, dz, *focal)
        else:
            module.sigmoid_ce_scale_(torch.ones(()), x if dx else x[:0], z if dz else z[:0])
    finally:
        setattr(module, kernel_attr, kernel)
        _grid.INT32_LIMIT = limit
        _launch.PLANS.clear()
    assert len(recorder.calls) == 1, f"{v.name}: {len(recorder.calls)} launches"
    args, kwargs = recorder.calls[0]
    if "MAX_PROGRAMS" in kwargs:  # the forward's reduction reads that many partial sums
        kwargs["MAX_PROGRAMS"] = H100_PARTIAL_SLOTS
    return kernel, args, kwargs


def jit_function(kernel):
    """The JITFunction under the tuning wrappers (each keeps it as `.fn`)."""
    import triton

    while not isinstance(kernel, triton.runtime.JITFunction):
        if not hasattr(kernel, "fn"):
            raise TypeError(f"{kernel!r} is not a compiled Triton kernel: is TRITON_INTERPRET set?")
        kernel = kernel.fn
    return kernel


def candidates(v: Variant, args: tuple, kwargs: dict, kernel) -> list[dict]:
    """The launch options (BLOCK, num_warps, ...) of every configs/ candidate
    the launch may run with, over every numel class: what kernels/_configs.py
    offers for the element size of the file's "dtype_arg"."""
    from fused_sigxent.kernels import _configs

    name = CONFIG_NAMES[v.kernel]
    spec = _configs.load(name)
    named = dict(zip(jit_function(kernel).arg_names, args)) | kwargs
    elem_bytes = named[spec["dtype_arg"]].element_size() if spec.get("dtype_arg") else 0
    out = []
    for size_class in range(len(spec["numel_class_bounds"]) + 1):
        for c in _configs.candidates(name, size_class, elem_bytes):
            if hasattr(_configs, "launch_options"):
                options = _configs.launch_options(c)
            else:
                options = {"BLOCK": c["BLOCK"], "num_warps": c["num_warps"], "num_stages": c.get("num_stages", 1)}
            if options not in out:
                out.append(options)
    return out


def compile_kernel(kernel, args: tuple, kwargs: dict, config: dict, arch: int = 90):
    """The CompiledKernel a launch with `config` would run on sm_<arch>:
    Triton's own binder specializes the arguments (pointer dtypes and
    16-byte alignment, integers equal to 1 or divisible by 16), as
    JITFunction.run does (create_function_from_signature and _pack_args:
    private, the same in Triton 3.6 and 3.9)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = jit_function(kernel)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = kwargs | config
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def _tool(name: str) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return os.path.join(os.path.dirname(get_ptxas(90).path), name)


def disassemble(cubin: bytes) -> tuple[list[str], dict]:
    """(SASS lines, resource usage) of a cubin, by Triton's nvdisasm and cuobjdump."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    usage = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", res)}
    return sass.splitlines(), usage


_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")


def instructions(sass: list[str]) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """[(address, instruction text)] and {label: address} of a disassembly."""
    instrs, labels, pending = [], {}, []
    for line in sass:
        if m := _LABEL.match(line):
            pending.append(m.group(1))
        elif m := _INSTR.match(line):
            address = int(m.group(1), 16)
            for label in pending:
                labels[label] = address
            pending = []
            instrs.append((address, m.group(2)))
    return instrs, labels


def opcode(text: str) -> str:
    """The opcode with its modifiers, predicate stripped: "LDG.E.128"."""
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def hot_loop(sass: list[str]) -> list[str]:
    """The instructions of the main loop: from the target of the backward
    branch that closes the grid-stride loop to that branch. Out-of-line slow
    paths (a branch out of the body to code placed after it) are not counted.
    Of several loops (the masked tail is a loop of quarter blocks, which
    ptxas may unroll), the one with the most unpredicated global accesses,
    the unmasked block loop; then the longest."""
    instrs, labels = instructions(sass)
    best, best_score = [], (-1, -1)
    for address, text in instrs:
        if not opcode(text).startswith("BRA"):
            continue
        m = re.search(r"`\((\.L_x_\d+)\)", text)
        if not m or labels[m.group(1)] >= address:
            continue  # forward branch, or the trap loop after EXIT
        body = [t for a, t in instrs if labels[m.group(1)] <= a <= address]
        unmasked = sum(opcode(t).startswith(("LDG", "STG")) and not t.startswith("@") for t in body)
        if (unmasked, len(body)) > best_score:
            best, best_score = body, (unmasked, len(body))
    return best


def _access_bytes(op: str) -> int:
    for width in (128, 64, 32, 16, 8):
        if f".{width}" in op:
            return width // 8
    return 4


def analyze(v: Variant, config: dict, compiled) -> dict:
    """One row: the hot loop's SASS and MUFU per element, registers, spills,
    vector accesses, and the predicted fraction of copy bandwidth."""
    sass, usage = disassemble(compiled.asm["cubin"])
    loop = hot_loop(sass)
    ops = [opcode(t) for t in loop]
    all_ops = [opcode(t) for _, t in instructions(sass)[0]]
    block, warps = config.get("BLOCK"), config.get("num_warps", 4)
    per_thread = block / (32 * warps)
    sass_per_elem = len(loop) / per_thread
    nbytes = v.bytes_per_element()
    ceiling = nbytes * ISSUE_RATE / COPY_BW  # SASS/element at which issue and copy rates meet
    ptx = compiled.asm["ptx"]
    return dict(
        variant=v.name, kernel=v.kernel, logits=v.logits, labels=v.labels, weight=v.weight or "",
        pos_weight=v.pos_weight or "", reduction=v.reduction, grads=v.grads, int64=v.int64, arch=v.arch,
        BLOCK=block, num_warps=warps, num_stages=config.get("num_stages", 1), elems_per_thread=per_thread,
        loop_sass=len(loop), sass_per_elem=round(sass_per_elem, 2),
        mufu_per_elem=round(sum(op.startswith("MUFU") for op in ops) / per_thread, 3),
        regs=usage.get("reg", 0), stack_bytes=usage.get("stack", 0),
        # The kernels keep no arrays in local memory, so every local access is
        # a spill: bytes stored plus loaded, as ptxas -v counts them.
        spill_bytes=sum(_access_bytes(op) for op in all_ops if op.startswith(("STL", "LDL"))),
        loop_ldg128=sum(op.startswith("LDG") and ".128" in op for op in ops),
        loop_stg128=sum(op.startswith("STG") and ".128" in op for op in ops),
        loop_ldg=sum(op.startswith("LDG") for op in ops), loop_stg=sum(op.startswith("STG") for op in ops),
        loop_f64=sum(op.startswith(("DADD", "DMUL", "DFMA", "DSETP", "F2F.F64", "F2F.F32.F64")) for op in ops),
        ptx_f64=len(re.findall(r"\.f64\b", ptx)), ptx_local=len(re.findall(r"\.local\b", ptx)),
        bytes_per_elem=nbytes, ceiling_sass_per_elem=round(ceiling, 1), budget_sass_per_elem=budget(v),
        predicted_pct_copy_bw=round(100 * min(1.0, ceiling / sass_per_elem), 1) if loop else float("nan"),
        # the share of the issue rate the loop takes at copy bandwidth (over 100: issue-bound)
        issue_pct_at_copy_bw=round(100 * sass_per_elem / ceiling, 1),
    )


def measure(v: Variant) -> list[dict]:
    """Rows for every launch configuration of variant `v`."""
    kernel, args, kwargs = launch_args(v)
    rows = []
    for config in candidates(v, args, kwargs, kernel):
        rows.append(analyze(v, config, compile_kernel(kernel, args, kwargs, config, v.arch)))
    return rows
