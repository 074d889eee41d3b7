"""Masking in one kernel: per-row sort of the noise -> ids_keep, ids_restore, mask.

One program per sample sorts its row of noise (padded to a power of two) as 64-bit keys: the noise's
float bits mapped to an order-preserving integer in the high half (-0.0 as +0.0, every NaN after
+inf), the position in the low half. Sorting the keys sorts the noise with ties broken by position,
i.e. ``argsort(noise, stable=True)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae.errors import UsageError
from fastmae.kernels._launch import FP_FUSION, on_device


@triton.jit
def _random_masking(noise_ptr, keep_ptr, restore_ptr, mask_ptr, L, len_keep, BLOCK_L: tl.constexpr):
    i_n = tl.program_id(0).to(tl.int64)
    o_l = tl.arange(0, BLOCK_L)
    m_l = o_l < L
    b_noise = tl.load(noise_ptr + i_n * L + o_l, mask=m_l, other=0.0).to(tl.float32)
    # as argsort orders them: -0.0 ties +0.0, and every NaN, of either sign, comes after +inf
    b_noise = tl.where(b_noise == 0.0, 0.0, b_noise)
    b_bits = tl.where(b_noise != b_noise, 0x7FC00000, b_noise.to(tl.int32, bitcast=True))
    # negative floats order backwards in their magnitude bits: flip them
    b_key = tl.where(b_bits < 0, b_bits ^ 0x7FFFFFFF, b_bits).to(tl.int64)
    b_key = (b_key << 32) | o_l.to(tl.int64)
    b_sorted = tl.sort(tl.where(m_l, b_key, 0x7FFFFFFFFFFFFFFF))  # padding sorts last
    b_shuffle = b_sorted & 0xFFFFFFFF  # ids_shuffle: positions in ascending noise order
    # o_l is now the rank: position b_shuffle[rank] has rank `rank`
    tl.store(keep_ptr + i_n * len_keep + o_l, b_shuffle, mask=o_l < len_keep)
    tl.store(restore_ptr + i_n * L + b_shuffle, o_l.to(tl.int64), mask=m_l)
    tl.store(mask_ptr + i_n * L + b_shuffle, (o_l >= len_keep).to(tl.float32), mask=m_l)


@torch.library.custom_op("fastmae::random_masking", mutates_args=())
def random_masking_op(noise: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    noise = noise.contiguous()
    n, L = noise.shape
    if noise.dtype == torch.float64:
        # the keys hold 32-bit floats; a float64 tie-break would differ from argsort's
        raise UsageError("the triton random_masking takes float32/float16/bfloat16 noise, got float64")
    ids_keep = torch.empty(n, len_keep, dtype=torch.int64, device=noise.device)
    ids_restore = torch.empty(n, L, dtype=torch.int64, device=noise.device)
    mask = torch.empty(n, L, dtype=torch.float32, device=noise.device)
    block = triton.next_power_of_2(L)
    with on_device(noise):
        _random_masking[(n,)](noise, ids_keep, ids_restore, mask, L, len_keep, BLOCK_L=block,
                              num_warps=4 if block <= 1024 else 8, enable_fp_fusion=FP_FUSION)
    return ids_keep, ids_restore, mask
