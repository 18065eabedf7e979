"""Programs of a compiled kernel that fit on one SM at once, by the CUDA
occupancy calculator's rules for threads, registers and shared memory."""

import functools
from dataclasses import dataclass

import torch

# Registers go to a warp in units of 256 (the occupancy calculator's register
# allocation unit on sm_50 and later).
REG_ALLOC_UNIT = 256
# Resident blocks per SM: 16 on sm_75/86/87, 24 on sm_89, 32 on the others
# (CUDA C Programming Guide, technical specifications per compute capability).
# The smallest is used: with >= 4 warps a program hits the thread limit first.
MAX_BLOCKS_PER_SM = 16
# Shared memory the driver reserves per block from sm_80 on.
SMEM_RESERVED_PER_BLOCK = 1024
# A streaming kernel keeps enough bytes in flight (one or more 16-byte
# accesses per thread per tensor) at half the SM's threads; below that a
# candidate leaves bandwidth unused, so the tuner drops it (kernels/_tuner.py).
MIN_OCCUPANCY = 0.5


@dataclass(frozen=True)
class SM:
    count: int
    max_threads: int
    registers: int
    shared_memory: int


@functools.lru_cache(maxsize=None)
def sm(index: int) -> SM:
    """The SMs of CUDA device `index` (torch's properties; the register file
    and shared memory fall back to sm_80/sm_90's where torch omits them)."""
    props = torch.cuda.get_device_properties(index)
    return SM(
        count=props.multi_processor_count,
        max_threads=getattr(props, "max_threads_per_multi_processor", 2048),
        registers=getattr(props, "regs_per_multiprocessor", 65536),
        shared_memory=getattr(props, "shared_memory_per_multiprocessor", 228 * 1024),
    )


def programs_per_sm(sm: SM, n_regs: int, num_warps: int, shared: int, warp_size: int = 32) -> int:
    """Resident programs per SM of a kernel using `n_regs` registers per
    thread (0: unknown), `num_warps` warps and `shared` bytes of shared
    memory per program; 0 if one program does not fit."""
    limits = [sm.max_threads // (num_warps * warp_size), MAX_BLOCKS_PER_SM]
    if n_regs:
        per_warp = -(-n_regs * warp_size // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
        limits.append(sm.registers // per_warp // num_warps)
    if shared:
        limits.append(sm.shared_memory // (shared + SMEM_RESERVED_PER_BLOCK))
    return max(min(limits), 0)


def occupancy(sm: SM, programs: int, num_warps: int, warp_size: int = 32) -> float:
    """The fraction of the SM's thread slots that `programs` resident programs fill."""
    return programs * num_warps * warp_size / sm.max_threads
