"""Decoder-side unshuffle: visible tokens back to their positions, the mask token elsewhere.

Forward, for ``x`` [N, 1+K, D] (row 0 is cls) and ``ids_restore`` [N, L]::

    out[n, 0]     = x[n, 0] + pos[0]
    out[n, 1 + l] = (x[n, 1 + r] if r < K else mask_token) + pos[1 + l],   r = ids_restore[n, l]

Backward walks the same rows: a kept position sends its gradient row to ``dx[n, 1 + r]`` (every
``dx`` row is written exactly once, since ``ids_restore`` is a permutation), a removed one adds it to
the mask token's gradient. That sum is deterministic: each program adds its rows in a fixed order
into its own fp32 partial row, and the partial rows are summed by one ``torch.sum``.
Fake kernels (from the op's spec) and autograd: :mod:`fastmae.ops.fused`.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastmae.kernels._launch import (
    FP_FUSION, accumulator_is_fp64, needs_int64_offsets, on_device, program_index, row_tiles,
)


@triton.jit
def _unshuffle_fwd(
    x_ptr, ids_ptr, tok_ptr, pos_ptr, out_ptr,
    n_rows, K, L, D, tiles_per_program,
    HAS_POS: tl.constexpr, FP64: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    i_p = program_index(INT64)
    o_d = tl.arange(0, BLOCK_W)
    m_d = o_d < D
    b_tok = tl.load(tok_ptr + o_d, mask=m_d, other=0.0)
    b_tok = b_tok.to(tl.float64) if FP64 else b_tok.to(tl.float32)
    for i_t in range(tiles_per_program):
        o_r = (i_p * tiles_per_program + i_t) * BLOCK_R + tl.arange(0, BLOCK_R)  # output row n*(L+1) + j
        m_r = o_r < n_rows
        o_n = o_r // (L + 1)
        o_j = o_r % (L + 1)  # 0: cls, 1 + l: position l
        b_r = tl.load(ids_ptr + o_n * L + o_j - 1, mask=m_r & (o_j > 0), other=-1).to(o_r.dtype)
        o_src = tl.where(o_j == 0, 0, b_r + 1)  # row of x; > K means removed
        m_vis = m_r & (o_src <= K)
        m = m_r[:, None] & m_d[None, :]
        b_x = tl.load(x_ptr + (o_n * (K + 1) + o_src)[:, None] * D + o_d[None, :],
                      mask=m_vis[:, None] & m_d[None, :], other=0.0)
        b_x = b_x.to(tl.float64) if FP64 else b_x.to(tl.float32)
        b_out = tl.where(m_vis[:, None], b_x, b_tok[None, :])
        if HAS_POS:
            b_pos = tl.load(pos_ptr + o_j[:, None] * D + o_d[None, :], mask=m)
            b_out += b_pos.to(tl.float64) if FP64 else b_pos.to(tl.float32)
        tl.store(out_ptr + o_r[:, None] * D + o_d[None, :], b_out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _unshuffle_bwd(
    dout_ptr, ids_ptr, dx_ptr, dtok_partial_ptr,
    n_rows, K, L, D, tiles_per_program,
    FP64: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    i_p = program_index(INT64)
    o_d = tl.arange(0, BLOCK_W)
    m_d = o_d < D
    b_dtok = tl.zeros([BLOCK_W], dtype=tl.float64 if FP64 else tl.float32)
    for i_t in range(tiles_per_program):
        o_r = (i_p * tiles_per_program + i_t) * BLOCK_R + tl.arange(0, BLOCK_R)
        m_r = o_r < n_rows
        o_n = o_r // (L + 1)
        o_j = o_r % (L + 1)
        b_r = tl.load(ids_ptr + o_n * L + o_j - 1, mask=m_r & (o_j > 0), other=-1).to(o_r.dtype)
        o_dst = tl.where(o_j == 0, 0, b_r + 1)
        m_vis = m_r & (o_dst <= K)
        m = m_r[:, None] & m_d[None, :]
        b_g = tl.load(dout_ptr + o_r[:, None] * D + o_d[None, :], mask=m, other=0.0)
        tl.store(dx_ptr + (o_n * (K + 1) + o_dst)[:, None] * D + o_d[None, :], b_g.to(dx_ptr.dtype.element_ty),
                 mask=m_vis[:, None] & m_d[None, :])
        b_g = b_g.to(tl.float64) if FP64 else b_g.to(tl.float32)
        b_dtok += tl.sum(tl.where(m_vis[:, None], 0.0, b_g), axis=0)
    tl.store(dtok_partial_ptr + i_p * D + o_d, b_dtok, mask=m_d)


def _out_dtype(x, mask_token, pos_embed) -> torch.dtype:
    dtype = torch.promote_types(x.dtype, mask_token.dtype)  # as the spec's fake (tests compare them)
    return dtype if pos_embed is None else torch.promote_types(dtype, pos_embed.dtype)


@torch.library.custom_op("fastmae::unshuffle_with_mask_token", mutates_args=())
def unshuffle_op(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: Optional[torch.Tensor]
) -> torch.Tensor:
    x = x.contiguous()
    ids_restore = ids_restore.contiguous()
    n, k1, d = x.shape
    L = ids_restore.shape[1]
    out = torch.empty(n, L + 1, d, dtype=_out_dtype(x, mask_token, pos_embed), device=x.device)
    t = row_tiles(n * (L + 1), d, x.device)
    with on_device(x):
        _unshuffle_fwd[t.grid](
            x, ids_restore, mask_token.contiguous(), pos_embed.contiguous() if pos_embed is not None else x, out,
            n * (L + 1), k1 - 1, L, d, t.tiles_per_program,
            HAS_POS=pos_embed is not None, FP64=accumulator_is_fp64(x, mask_token, pos_embed),
            INT64=needs_int64_offsets(out), BLOCK_R=t.BLOCK_R, BLOCK_W=t.BLOCK_W, num_warps=t.num_warps,
            enable_fp_fusion=FP_FUSION,
        )
    return out


@torch.library.custom_op("fastmae::unshuffle_with_mask_token_backward", mutates_args=())
def unshuffle_backward_op(
    dout: torch.Tensor, ids_restore: torch.Tensor, k1: int, x_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx [N, 1+K, D] in ``x_dtype``, mask-token gradient [D] in the accumulator dtype)"""
    dout = dout.contiguous()
    n, L1, d = dout.shape
    fp64 = accumulator_is_fp64(dout)
    dx = torch.empty(n, k1, d, dtype=x_dtype, device=dout.device)
    t = row_tiles(n * L1, d, dout.device, reducing=True)
    partial = torch.empty(t.grid[0], d, dtype=torch.float64 if fp64 else torch.float32, device=dout.device)
    with on_device(dout):
        _unshuffle_bwd[t.grid](
            dout, ids_restore.contiguous(), dx, partial, n * L1, k1 - 1, L1 - 1, d, t.tiles_per_program,
            FP64=fp64, INT64=needs_int64_offsets(dout), BLOCK_R=t.BLOCK_R, BLOCK_W=t.BLOCK_W, num_warps=t.num_warps,
            enable_fp_fusion=FP_FUSION,
        )
    return dx, partial.sum(0)
