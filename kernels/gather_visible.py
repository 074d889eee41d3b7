"""Encoder-side gathers: the visible rows of a token tensor, or the visible patches of an image;
and the encoder's input assembled from the visible patches' embeddings.

``gather_visible``: ``out[n, k] = x[n, ids_keep[n, k]] (+ pos_embed[ids_keep[n, k]])``; its backward
writes every row of ``dx`` once (the gradient row for kept positions, zeros for removed ones), so
it needs neither a memset nor atomics, and, in one launch, no inverse map either: each row finds
its visible index among its sample's K kept positions (a few cached loads per row).

``gather_patches``: ``out[n, k] = the pixels of patch ids_keep[n, k] of imgs[n]``, flattened in the
patch-embedding weight's (c, i, j) order, so that embedding only the visible patches is one GEMM;
written in ``dtype`` (the GEMM's under autocast), so that no cast pass follows.

``encoder_input``: ``out[n, 0] = cls + pos_embed[0]``, ``out[n, 1 + k] = x[n, k] + pos_embed[1 +
ids_keep[n, k]]``: the embedding GEMM's (bf16) output read once, the (fp32) encoder input written
once, instead of a gather of the position rows, an add, the cls token's add and a concatenation.

Fake kernels (shared with the native backend) and autograd: :mod:`fastmae.ops.fused`.
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
def _gather_rows_fwd(
    x_ptr, pos_ptr, ids_ptr, out_ptr,
    n_rows, K, L, D, tiles_per_program,
    HAS_POS: tl.constexpr, FP64: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    i_p = program_index(INT64)
    o_d = tl.arange(0, BLOCK_W)
    m_d = o_d < D
    for i_t in range(tiles_per_program):
        o_r = (i_p * tiles_per_program + i_t) * BLOCK_R + tl.arange(0, BLOCK_R)  # output row n*K + k
        m_r = o_r < n_rows
        b_l = tl.load(ids_ptr + o_r, mask=m_r, other=0).to(o_r.dtype)  # [BR] source position l
        o_src = (o_r // K) * L + b_l
        m = m_r[:, None] & m_d[None, :]
        b_x = tl.load(x_ptr + o_src[:, None] * D + o_d[None, :], mask=m)  # [BR, BW]
        b_x = b_x.to(tl.float64) if FP64 else b_x.to(tl.float32)
        if HAS_POS:
            b_pos = tl.load(pos_ptr + b_l[:, None] * D + o_d[None, :], mask=m)
            b_x += b_pos.to(tl.float64) if FP64 else b_pos.to(tl.float32)
        tl.store(out_ptr + o_r[:, None] * D + o_d[None, :], b_x.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gather_rows_bwd(
    dout_ptr, ids_ptr, dx_ptr,
    n_rows, K, L, D, tiles_per_program,
    INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i_p = program_index(INT64)
    o_d = tl.arange(0, BLOCK_W)
    m_d = o_d < D
    for i_t in range(tiles_per_program):
        o_r = (i_p * tiles_per_program + i_t) * BLOCK_R + tl.arange(0, BLOCK_R)  # dx row n*L + l
        m_r = o_r < n_rows
        o_n = o_r // L
        o_l = o_r % L
        # [BR] the visible index k of position l (ids_keep[n, k] == l), -1 if l was removed
        b_k = tl.full([BLOCK_R], -1, dtype=o_r.dtype)
        for i_k in range(0, K, BLOCK_K):
            o_k = i_k + tl.arange(0, BLOCK_K)
            b_ids = tl.load(ids_ptr + o_n[:, None] * K + o_k[None, :], mask=m_r[:, None] & (o_k < K)[None, :], other=-1)
            b_k = tl.maximum(b_k, tl.max(tl.where(b_ids == o_l[:, None], o_k[None, :], -1), axis=1).to(o_r.dtype))
        m_kept = m_r & (b_k >= 0)
        o_src = o_n * K + b_k
        b_g = tl.load(dout_ptr + o_src[:, None] * D + o_d[None, :], mask=m_kept[:, None] & m_d[None, :], other=0.0)
        tl.store(dx_ptr + o_r[:, None] * D + o_d[None, :], b_g.to(dx_ptr.dtype.element_ty),
                 mask=m_r[:, None] & m_d[None, :])


@triton.jit
def _gather_patches_fwd(
    img_ptr, ids_ptr, out_ptr,
    n_rows, K, C, H, W, GW, tiles_per_program,
    P: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    i_p = program_index(INT64)
    o_e = tl.arange(0, BLOCK_W)  # element of the patch, (c, i, j) order
    m_e = o_e < C * P * P
    o_c = o_e // (P * P)
    o_i = (o_e // P) % P
    o_j = o_e % P
    for i_t in range(tiles_per_program):
        o_r = (i_p * tiles_per_program + i_t) * BLOCK_R + tl.arange(0, BLOCK_R)  # output row n*K + k
        m_r = o_r < n_rows
        b_l = tl.load(ids_ptr + o_r, mask=m_r, other=0).to(o_r.dtype)
        o_n = o_r // K
        o_h = (b_l // GW) * P
        o_w = (b_l % GW) * P
        o_img = ((o_n[:, None] * C + o_c[None, :]) * H + o_h[:, None] + o_i[None, :]) * W + o_w[:, None] + o_j[None, :]
        m = m_r[:, None] & m_e[None, :]
        b_px = tl.load(img_ptr + o_img, mask=m)
        tl.store(out_ptr + o_r[:, None] * (C * P * P) + o_e[None, :], b_px.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _encoder_input_fwd(
    x_ptr, ids_ptr, cls_ptr, pos_ptr, out_ptr,
    n_rows, K, D, tiles_per_program,
    FP64: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    i_p = program_index(INT64)
    o_d = tl.arange(0, BLOCK_W)
    m_d = o_d < D
    b_cls = tl.load(cls_ptr + o_d, mask=m_d, other=0.0)
    b_cls = b_cls.to(tl.float64) if FP64 else b_cls.to(tl.float32)
    for i_t in range(tiles_per_program):
        o_r = (i_p * tiles_per_program + i_t) * BLOCK_R + tl.arange(0, BLOCK_R)  # output row n*(K+1) + j
        m_r = o_r < n_rows
        o_n = o_r // (K + 1)
        o_j = o_r % (K + 1)  # 0: cls, 1 + k: visible patch k, row n*K + k = o_r - o_n - 1 of x
        m_vis = m_r & (o_j > 0)
        b_l = tl.load(ids_ptr + o_r - o_n - 1, mask=m_vis, other=-1).to(o_r.dtype)  # position; -1: cls
        m = m_r[:, None] & m_d[None, :]
        b_x = tl.load(x_ptr + (o_r - o_n - 1)[:, None] * D + o_d[None, :], mask=m_vis[:, None] & m_d[None, :],
                      other=0.0)
        b_x = b_x.to(tl.float64) if FP64 else b_x.to(tl.float32)
        b_out = tl.where(m_vis[:, None], b_x, b_cls[None, :])
        b_pos = tl.load(pos_ptr + (b_l + 1)[:, None] * D + o_d[None, :], mask=m)
        b_out += b_pos.to(tl.float64) if FP64 else b_pos.to(tl.float32)
        tl.store(out_ptr + o_r[:, None] * D + o_d[None, :], b_out.to(out_ptr.dtype.element_ty), mask=m)


# -- gather_visible ------------------------------------------------------------------------------

@torch.library.custom_op("fastmae::gather_visible", mutates_args=())
def gather_visible_op(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: Optional[torch.Tensor]) -> torch.Tensor:
    x = x.contiguous()
    ids_keep = ids_keep.contiguous()
    n, L, d = x.shape
    k = ids_keep.shape[1]
    dtype = x.dtype if pos_embed is None else torch.promote_types(x.dtype, pos_embed.dtype)
    out = torch.empty(n, k, d, dtype=dtype, device=x.device)
    t = row_tiles(n * k, d, x.device)
    with on_device(x):
        _gather_rows_fwd[t.grid](
            x, pos_embed.contiguous() if pos_embed is not None else x, ids_keep, out,
            n * k, k, L, d, t.tiles_per_program,
            HAS_POS=pos_embed is not None, FP64=accumulator_is_fp64(x, pos_embed),
            INT64=needs_int64_offsets(x, out),
            BLOCK_R=t.BLOCK_R, BLOCK_W=t.BLOCK_W, num_warps=t.num_warps, enable_fp_fusion=FP_FUSION,
        )
    return out


@torch.library.custom_op("fastmae::gather_visible_backward", mutates_args=())
def gather_visible_backward_op(dout: torch.Tensor, ids_keep: torch.Tensor, L: int, dtype: torch.dtype) -> torch.Tensor:
    dout = dout.contiguous()
    n, k, d = dout.shape
    dx = torch.empty(n, L, d, dtype=dtype, device=dout.device)
    t = row_tiles(n * L, d, dout.device)
    with on_device(dout):
        _gather_rows_bwd[t.grid](
            dout, ids_keep.contiguous(), dx, n * L, k, L, d, t.tiles_per_program, INT64=needs_int64_offsets(dx),
            BLOCK_R=t.BLOCK_R, BLOCK_W=t.BLOCK_W, BLOCK_K=min(triton.next_power_of_2(max(k, 1)), 64),
            num_warps=t.num_warps, enable_fp_fusion=FP_FUSION,
        )
    return dx


# -- gather_patches ------------------------------------------------------------------------------

@torch.library.custom_op("fastmae::gather_patches", mutates_args=())
def gather_patches_op(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, dtype: torch.dtype) -> torch.Tensor:
    imgs = imgs.contiguous()
    ids_keep = ids_keep.contiguous()
    n, c, H, W = imgs.shape
    k = ids_keep.shape[1]
    p = patch_size
    out = torch.empty(n, k, c * p * p, dtype=dtype, device=imgs.device)
    t = row_tiles(n * k, c * p * p, imgs.device)
    with on_device(imgs):
        _gather_patches_fwd[t.grid](
            imgs, ids_keep, out, n * k, k, c, H, W, W // p, t.tiles_per_program,
            P=p, INT64=needs_int64_offsets(imgs, out), BLOCK_R=t.BLOCK_R, BLOCK_W=t.BLOCK_W, num_warps=t.num_warps,
            enable_fp_fusion=FP_FUSION,
        )
    return out


# -- encoder_input -------------------------------------------------------------------------------

@torch.library.custom_op("fastmae::encoder_input", mutates_args=())
def encoder_input_op(x: torch.Tensor, ids_keep: torch.Tensor, cls_token: torch.Tensor,
                     pos_embed: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    n, k, d = x.shape
    dtype = torch.promote_types(torch.promote_types(x.dtype, cls_token.dtype), pos_embed.dtype)
    out = torch.empty(n, k + 1, d, dtype=dtype, device=x.device)
    t = row_tiles(n * (k + 1), d, x.device)
    with on_device(x):
        _encoder_input_fwd[t.grid](
            x, ids_keep.contiguous(), cls_token.contiguous(), pos_embed.contiguous(), out,
            n * (k + 1), k, d, t.tiles_per_program,
            FP64=accumulator_is_fp64(x, cls_token, pos_embed), INT64=needs_int64_offsets(x, out, pos_embed),
            BLOCK_R=t.BLOCK_R, BLOCK_W=t.BLOCK_W, num_warps=t.num_warps, enable_fp_fusion=FP_FUSION,
        )
    return out
