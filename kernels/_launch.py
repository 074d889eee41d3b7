"""Launch settings for every kernel, chosen in one place.

The kernels are memory-bound row operations: each program moves a tile of ``BLOCK_R`` rows by
``BLOCK_W`` columns per iteration. On a GPU a tile holds about 4096 elements (16 KB in fp32) so that
enough bytes are in flight per warp; under the Triton interpreter (CPU, tests) each program instance
costs milliseconds whatever its size, so tiles are as large as the shape allows.
"""
from __future__ import annotations

import functools
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

try:
    from triton import knobs

    INTERPRET = bool(knobs.runtime.interpret)
except ImportError:  # triton < 3.4
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

TILE_ELEMENTS = 4096
INTERPRET_TILE_ELEMENTS = 1 << 16
# Kernels that reduce across rows into one partial row per program keep that buffer small by
# running a few waves of programs that each loop over several tiles.
REDUCING_PROGRAMS_PER_SM = 4


@dataclass(frozen=True)
class RowTiles:
    BLOCK_R: int  # rows per tile
    BLOCK_W: int  # columns per tile (the row width rounded up to a power of two)
    tiles_per_program: int
    grid: tuple[int]
    num_warps: int


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def row_tiles(n_rows: int, width: int, device: torch.device, *, reducing: bool = False) -> RowTiles:
    block_w = triton.next_power_of_2(max(width, 1))
    budget = INTERPRET_TILE_ELEMENTS if INTERPRET else TILE_ELEMENTS
    block_r = max(1, min(budget // block_w, triton.next_power_of_2(max(n_rows, 1))))
    n_tiles = triton.cdiv(n_rows, block_r)
    per_program = 1
    if reducing and device.type == "cuda" and not INTERPRET:
        max_programs = REDUCING_PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        per_program = triton.cdiv(n_tiles, max_programs)
    num_warps = 8 if block_r * block_w >= 4096 else 4
    return RowTiles(block_r, block_w, per_program, (max(1, triton.cdiv(n_tiles, per_program)),), num_warps)


# The row kernels divide row numbers to find a row's sample and position: 32-bit offsets where every
# tensor they address is small enough (64-bit integer division costs a GPU tens of instructions),
# 64-bit beyond (with room for the masked lanes of a last tile).
INT32_OFFSETS_BELOW = 2**30

# Fused multiply-adds, as nvcc compiles PyTorch's own kernels; passed to every launch because Triton
# 3.10 turns its default off (3.9 warns that it will).
FP_FUSION = True


def needs_int64_offsets(*tensors: torch.Tensor | None) -> bool:
    return any(t is not None and t.numel() >= INT32_OFFSETS_BELOW for t in tensors)


@triton.jit
def program_index(INT64: tl.constexpr):
    """This program's index, in the width of the kernel's offsets (its row numbers derive from it)."""
    i_p = tl.program_id(0)
    if INT64:
        i_p = i_p.to(tl.int64)
    return i_p


@triton.jit
def div_rn(a, b):
    """fp32 ``a / b`` correctly rounded, as the native kernels and PyTorch on a CPU divide: a kernel's
    fp32 ``/`` compiles to an approximate division on GPUs (a division by a constant to a
    multiplication by an approximate reciprocal), which the interpreter's numpy does not show. ``b``
    is broadcast to ``a``'s shape."""
    return tl.math.div_rn(a, b + tl.zeros_like(a))


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


def accumulator_is_fp64(*tensors: torch.Tensor) -> bool:
    """Kernels accumulate in fp32, or in fp64 when any input is fp64 (gradcheck)."""
    return any(t is not None and t.dtype == torch.float64 for t in tensors)
